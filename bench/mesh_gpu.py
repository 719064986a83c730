"""The whole mesh on a GPU machine, as `nanopd up` starts it: router, gateway and a collocated,
a prefill and a decode worker, each its own process (on one GPU all three share cuda:0; with
two, decode takes cuda:1), on a random-weight model of a real shape with a real tokenizer.

Checks: every route gives the same greedy tokens (collocated = disaggregated over each KV
transport the pair has); 32 concurrent disaggregated requests all finish; `status` says every
service is healthy; no KV block is held anywhere afterwards; then `down`. Writes a JSON
record with per-request latencies (first token and total, as the client sees them).

    python3 bench/mesh_gpu.py --tokenizer .tok --out mesh_gpu.json
(the GPU machine has no pyzmq: install a carried cp312 wheel first, see bench/results)
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.client import Client  # noqa: E402
from services.worker.models.random_model import write_random_model  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain KV caches in one sentence.", "List three prime numbers."]


def cli(*args: str, timeout_s: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def write_config(path: Path, model: Path, run_dir: Path, num_gpus: int) -> None:
    decode_dev = "cuda:1" if num_gpus > 1 else "cuda:0"
    engine = 'engine = { dtype = "bfloat16", num_kv_blocks = 6144, max_num_seqs = 64 }'
    workers = [("colloc0", "collocated", "cuda:0"), ("prefill0", "prefill", "cuda:0"),
               ("decode0", "decode", decode_dev)]
    text = [f'model = "{model}"', f'run_dir = "{run_dir}"', 'strategy = "adaptive"', "",
            "[gateway]", 'zmq = "tcp://127.0.0.1:5599"', 'http = "127.0.0.1:8099"']
    for name, role, dev in workers:
        text += ["", "[[workers]]", f'name = "{name}"', f'role = "{role}"',
                 f'device = "{dev}"', engine]
    path.write_text("\n".join(text) + "\n")


def timed(prompt: str, route: str, max_tokens: int) -> dict:
    with Client("tcp://127.0.0.1:5599", timeout_s=120) as c:
        t0 = time.perf_counter()
        first, tokens = None, []
        for delta in c.stream(prompt, route=route, max_tokens=max_tokens, temperature=0,
                              ignore_eos=True):
            if first is None and delta.token_ids:
                first = time.perf_counter() - t0
            tokens += delta.token_ids
        return {"route": route, "ttft_s": first, "e2e_s": time.perf_counter() - t0,
                "token_ids": tokens}


def no_blocks_held(status_dir: Path, timeout_s: float = 20) -> bool:
    """Every worker's status file says all blocks free and nothing running (they refresh
    every heartbeat), and the router has nothing in flight."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = {f.stem: json.loads(f.read_text()) for f in status_dir.glob("*.json")}
        workers = [s for s in st.values() if s.get("role") in ("collocated", "prefill",
                                                                "decode")]
        if len(workers) == 3 and all(s["num_free_blocks"] == s["num_blocks"]
                                     and s["num_running"] == 0 for s in workers) and (
                st.get("router", {}).get("in_flight") == 0):
            return True
        time.sleep(0.5)
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-1.5b", help="a shape of random_model.SHAPES")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer files to copy in")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--out", help="write the record here as JSON")
    args = p.parse_args()
    record: dict = {"bench": "mesh_gpu", "date": datetime.date.today().isoformat(),
                    "device": torch.cuda.get_device_name(), "num_gpus": torch.cuda.device_count(),
                    "shape": args.shape, "checks": {}}
    tmp = Path(tempfile.mkdtemp(prefix="nanopd-mesh-"))
    model = write_random_model(tmp / "model", args.shape, dtype="bfloat16",
                               tokenizer_dir=args.tokenizer, device="cuda")
    torch.cuda.empty_cache()
    config = tmp / "mesh.toml"
    write_config(config, model, tmp / "run", record["num_gpus"])
    up = cli("up", "--config", str(config), "--timeout", "360")
    record["up"] = {"rc": up.returncode, "out": (up.stdout + up.stderr)[-3000:]}
    try:
        if up.returncode != 0:
            raise RuntimeError("nanopd up failed")
        runs = [timed(pr, route, args.max_tokens) for pr in PROMPTS
                for route in ("collocated", "disaggregated", "collocated", "disaggregated")]
        by_prompt = {}
        for pr, i in zip(PROMPTS, range(0, len(runs), 4), strict=True):
            by_prompt[pr] = [r["token_ids"] for r in runs[i:i + 4]]
        record["checks"]["disaggregated_equals_collocated"] = all(
            len(set(map(tuple, ids))) == 1 and len(ids[0]) == args.max_tokens
            for ids in by_prompt.values())
        with ThreadPoolExecutor(32) as pool:
            conc = list(pool.map(lambda i: timed(PROMPTS[i % 4], "disaggregated",
                                                 args.max_tokens), range(32)))
        record["checks"]["concurrent_32_all_finished"] = all(
            len(r["token_ids"]) == args.max_tokens for r in conc)
        record["checks"]["concurrent_equal_sequential"] = all(
            r["token_ids"] == by_prompt[PROMPTS[i % 4]][1] for i, r in enumerate(conc))
        for r in runs + conc:
            r.pop("token_ids")
        record["sequential"], record["concurrent_32"] = runs, conc
        st = cli("status", "--config", str(config), "--json")
        status = json.loads(st.stdout) if st.returncode == 0 else st.stderr
        record["status"] = status
        record["checks"]["all_healthy"] = isinstance(status, list) and all(
            s.get("healthy") for s in status)
        record["checks"]["no_kv_blocks_held"] = no_blocks_held(tmp / "run" / "status")
    except Exception as e:  # noqa: BLE001 - the record says what failed, then the mesh stops
        record["error"] = f"{type(e).__name__}: {e}"
        for name in ("router", "gateway", "colloc0", "prefill0", "decode0"):
            lg = cli("logs", "--config", str(config), "-n", "40", name)
            record.setdefault("logs", {})[name] = lg.stdout[-4000:]
    finally:
        down = cli("down", "--config", str(config))
        record["down_rc"] = down.returncode
    record["ok"] = bool(record["checks"]) and all(record["checks"].values())
    print(json.dumps({k: v for k, v in record.items() if k not in ("sequential",
                                                                    "concurrent_32")},
                     indent=1)[-6000:])
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
