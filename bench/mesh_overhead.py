"""What the control plane costs: gateway -> router -> worker with a null model.

Starts a router, one null-model worker (fixed tokens, no compute) and the gateway as real
processes, then measures through the native ZMQ API:
- latency: one request at a time (1 prompt token id, max_tokens 1, non-streaming), submit
  to final reply, p50/p99. With no model compute, all of it is control-plane overhead.
- throughput: requests/s with `--inflight` requests outstanding, closed loop.
- for both: CPU time per request of each process (router, worker, gateway, this client).
Goal (issue 4): p50 <= 1 ms added, >= 5,000 requests/s on a 2-core machine.

    python bench/mesh_overhead.py --out bench/results/mesh_overhead.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.health import read_status  # noqa: E402
from common.protocol import Error, Submit, TokenDelta, decode_batch, encode  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mesh(run_dir: Path) -> tuple[list[subprocess.Popen], str]:
    zmq_addr = f"tcp://127.0.0.1:{free_port()}"
    (run_dir / "mesh.toml").write_text(
        f'model = "null"\nrun_dir = "{run_dir}"\nstrategy = "collocated"\n'
        f'[gateway]\nzmq = "{zmq_addr}"\nhttp = "127.0.0.1:{free_port()}"\n'
        '[[workers]]\nname = "null0"\nrole = "collocated"\ndevice = "cpu"\n'
    )
    cfg = str(run_dir / "mesh.toml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPD_THREADS": "1"}
    cmds = [["-m", "services.router"], ["-m", "services.worker", "--name", "null0"],
            ["-m", "services.gateway"]]
    procs = []
    for cmd in cmds:
        log = open(run_dir / f"{cmd[1].split('.')[-1]}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, *cmd, "--config", cfg], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = read_status(run_dir)
        if all(st.get(n, {}).get("healthy") for n in ("router", "null0", "gateway")):
            time.sleep(1.0)  # the worker's first heartbeat reaches the router
            return procs, zmq_addr
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    stop(procs)
    raise RuntimeError(f"mesh did not come up; logs in {run_dir}")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def submit(sock: zmq.Socket, tag: int) -> None:
    sock.send_multipart(encode(Submit(token_ids=[1], stream=False, client_tag=str(tag),
                                      sampling={"max_tokens": 1, "temperature": 0.0})))


def wait_finals(sock: zmq.Socket, timeout_ms: int = 10_000) -> int:
    """Block until a batch of replies with at least one final one; how many were final."""
    while True:
        if not sock.poll(timeout_ms):
            raise TimeoutError(f"no reply within {timeout_ms} ms")
        num_final = 0
        for msg in decode_batch(sock.recv_multipart()):
            if isinstance(msg, (Error, Exception)):
                raise RuntimeError(f"request failed: {msg}")
            if isinstance(msg, TokenDelta) and msg.finish_reason is not None:
                num_final += 1
        if num_final:
            return num_final


SERVICES = ("router", "worker", "gateway")  # the order start_mesh starts them in


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time per request of each service and of this client, over one phase: on a shared
    machine a steadier figure than wall-clock time, and it says where the time goes."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def start(self) -> None:
        self.t0 = [cpu_s(p) for p in self.pids] + [time.process_time()]

    def per_request_us(self, num_requests: int) -> dict[str, float]:
        t1 = [cpu_s(p) for p in self.pids] + [time.process_time()]
        us = {name: (b - a) * 1e6 / num_requests
              for name, a, b in zip((*SERVICES, "client"), self.t0, t1, strict=True)}
        us["total"] = sum(us.values())
        return us


def measure(addr: str, pids: list[int], num_latency: int, num_throughput: int,
            inflight: int) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    cpu = CpuMeter(pids)
    for i in range(50):  # warm-up
        submit(sock, i)
        wait_finals(sock)
    lat = []
    cpu.start()
    for i in range(num_latency):
        t0 = time.perf_counter()
        submit(sock, i)
        wait_finals(sock)
        lat.append((time.perf_counter() - t0) * 1e3)
    latency_cpu = cpu.per_request_us(num_latency)
    lat.sort()
    cpu.start()
    t0 = time.perf_counter()
    sent = done = 0
    while sent < min(inflight, num_throughput):
        submit(sock, sent)
        sent += 1
    while done < num_throughput:
        num_final = wait_finals(sock)
        done += num_final
        for _ in range(min(num_final, num_throughput - sent)):
            submit(sock, sent)
            sent += 1
    secs = time.perf_counter() - t0
    throughput_cpu = cpu.per_request_us(num_throughput)
    ctx.destroy()
    return {
        "latency_ms": {"p50": statistics.median(lat), "p99": lat[int(0.99 * (len(lat) - 1))],
                       "mean": statistics.fmean(lat), "n": len(lat),
                       "cpu_us_per_request": latency_cpu},
        "throughput": {"requests": num_throughput, "inflight": inflight, "seconds": secs,
                       "requests_per_s": num_throughput / secs,
                       "cpu_us_per_request": throughput_cpu},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-latency", type=int, default=2000)
    ap.add_argument("--num-throughput", type=int, default=20000)
    ap.add_argument("--inflight", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs, each on a freshly started mesh; the JSON has every run and "
                         "the median, min and max of each figure")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="nanopd-mesh-") as tmp:
            procs, addr = start_mesh(Path(tmp))
            try:
                runs.append(measure(addr, [p.pid for p in procs], args.num_latency,
                                    args.num_throughput, args.inflight))
            finally:
                stop(procs)
    result = runs[0] if len(runs) == 1 else {"runs": runs, "summary": summarize(runs)}
    result.update({
        "bench": "mesh_overhead", "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "path": "client DEALER -> gateway -> router -> null worker -> gateway -> client",
    })
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def summarize(runs: list[dict]) -> dict:
    """Median, min and max over runs of the headline figures."""
    figures = {
        "latency_p50_ms": [r["latency_ms"]["p50"] for r in runs],
        "latency_p99_ms": [r["latency_ms"]["p99"] for r in runs],
        "requests_per_s": [r["throughput"]["requests_per_s"] for r in runs],
        "latency_cpu_us_per_request": [r["latency_ms"]["cpu_us_per_request"]["total"]
                                       for r in runs],
        "throughput_cpu_us_per_request": [r["throughput"]["cpu_us_per_request"]["total"]
                                          for r in runs],
    }
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for name, v in figures.items()}


if __name__ == "__main__":
    main()
