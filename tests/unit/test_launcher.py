"""The launcher with stand-in services: each is a tiny script that writes its status file
like the real services do, and behaves as STANDIN_<NAME> (or the file standin-<name> next to
the run dir) says: ok, never (healthy), crash, stubborn (ignores SIGTERM)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from common.config import MeshConfig, WorkerConfig
from common.health import status_dir
from services import launcher
from services.cli import main
from services.launcher_config import dump_toml, plan, worker_threads
from services.launcher_proc import running

STANDIN = textwrap.dedent("""
    import os, signal, sys, time
    from common.config import MeshConfig
    from common.health import clear_status, write_status

    module, args = sys.argv[1], sys.argv[2:]
    cfg = MeshConfig.load(args[args.index("--config") + 1])
    name = args[args.index("--name") + 1] if "--name" in args else module.split(".")[-1]
    role = cfg.worker(name).role if "--name" in args else name
    mode_file = cfg.run_path.parent / f"standin-{name}"  # restart keeps up's environment
    mode = mode_file.read_text() if mode_file.exists() else os.environ.get(
        "STANDIN_" + name.upper(), "ok")
    print(f"standin {name} threads={os.environ['NANOPD_THREADS']} "
          f"omp={os.environ['OMP_NUM_THREADS']} unbuffered={os.environ['PYTHONUNBUFFERED']}")
    if mode == "crash":
        print("standin crashing on purpose", file=sys.stderr)
        sys.exit(3)
    stopping = []
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn"
                  else lambda *_: stopping.append(1))
    while not stopping:
        if mode != "never":
            write_status(cfg.run_path, name, role=role, device="cpu")
        time.sleep(0.05)
    clear_status(cfg.run_path, name)
""")

CONFIG = """
[[workers]]
name = "colloc0"
role = "collocated"

[[workers]]
name = "prefill0"
role = "prefill"

[[workers]]
name = "decode0"
role = "decode"
threads = 3
"""


@pytest.fixture
def mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(config path, run dir); stand-in services; whatever a test leaves running is stopped."""
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    monkeypatch.setattr(launcher, "default_program",
                        lambda module: [sys.executable, str(script), module])
    config = tmp_path / "mesh.toml"
    config.write_text(CONFIG)
    run_dir = tmp_path / "run"
    yield str(config), run_dir
    launcher.down(run_dir, timeout_s=1)


def _pids(run_dir: Path) -> dict[str, int]:
    return {row["name"]: row["pid"] for row in launcher.status(run_dir)}


def test_up_status_restart_down(mesh):
    config, run_dir = mesh
    lines: list[str] = []
    info = launcher.up(config, run_dir, timeout_s=20, echo=lines.append)
    names = ["router", "colloc0", "prefill0", "decode0", "gateway"]
    assert [row["name"] for row in info["services"]] == names  # start order
    assert all(row["healthy"] and row["state"] == "healthy" for row in info["services"])
    assert info["endpoints"] == {"zmq": "tcp://127.0.0.1:5555", "http": "http://127.0.0.1:8000/v1"}
    assert any("decode0 is healthy" in line for line in lines)
    # the run dir's mesh.toml is what the services read, with the run dir made absolute
    assert MeshConfig.load(run_dir / "mesh.toml").run_dir == str(run_dir.resolve())
    # each worker's thread pool: its `threads` setting, else a share of the cores; logs per service
    assert "threads=3 omp=3 unbuffered=1" in "\n".join(launcher.logs("decode0", run_dir))
    assert "threads=1 omp=1" in "\n".join(launcher.logs("gateway", run_dir))

    before = _pids(run_dir)
    row = launcher.restart("decode0", run_dir, timeout_s=20, echo=lines.append)
    after = _pids(run_dir)
    assert row["healthy"] and row["pid"] == after["decode0"] != before["decode0"]
    assert not running(before["decode0"])
    assert {n: p for n, p in after.items() if n != "decode0"} == {
        n: p for n, p in before.items() if n != "decode0"}
    assert all(r["healthy"] for r in launcher.status(run_dir))
    assert launcher.logs("decode0", run_dir, 100).count("standin decode0 threads=3 omp=3 "
                                                        "unbuffered=1") == 2  # appended

    stopped = launcher.down(run_dir)
    assert {r["name"]: r["how"] for r in stopped} == dict.fromkeys(names, "stopped")
    assert not any(running(pid) for pid in after.values())
    assert list(status_dir(run_dir).glob("*.json")) == []
    assert launcher.status(run_dir) == [] and launcher.down(run_dir) == []


def test_up_refuses_while_a_mesh_runs(mesh):
    config, run_dir = mesh
    launcher.up(config, run_dir, timeout_s=20, echo=lambda _: None)
    pids = _pids(run_dir)
    with pytest.raises(launcher.LaunchError, match="already running in .*router \\(pid"):
        launcher.up(config, run_dir, timeout_s=20, echo=lambda _: None)
    assert _pids(run_dir) == pids and all(running(p) for p in pids.values())


def test_a_service_that_never_gets_healthy_fails_up_and_nothing_is_left(mesh, monkeypatch):
    config, run_dir = mesh
    monkeypatch.setenv("STANDIN_PREFILL0", "never")
    pids: list[int] = []
    echo = lambda line: pids.append(int(line.split("pid")[1].split()[0])) if "pid" in line else 0
    with pytest.raises(launcher.LaunchError) as e:
        launcher.up(config, run_dir, timeout_s=1.5, echo=echo)
    text = str(e.value)
    assert "timed out after 1.5 s waiting for prefill0" in text
    assert "standin prefill0 threads=" in text  # the tail of its log
    assert "colloc0" not in text.split("waiting for")[1].splitlines()[0]
    assert len(pids) == 5 and not any(running(p) for p in pids)
    assert list(status_dir(run_dir).glob("*.json")) == [] and launcher.status(run_dir) == []


def test_a_crashing_service_fails_up_at_once_with_its_exit_code(mesh, monkeypatch):
    config, run_dir = mesh
    monkeypatch.setenv("STANDIN_ROUTER", "crash")
    with pytest.raises(launcher.LaunchError, match="router exited with code 3") as e:
        launcher.up(config, run_dir, timeout_s=60, echo=lambda _: None)
    assert "crashing on purpose" in str(e.value) and launcher.status(run_dir) == []


def test_a_failed_restart_leaves_that_service_stopped_and_the_others_running(mesh):
    config, run_dir = mesh
    launcher.up(config, run_dir, timeout_s=20, echo=lambda _: None)
    (run_dir.parent / "standin-colloc0").write_text("crash")
    with pytest.raises(launcher.LaunchError, match="colloc0 exited with code 3(.|\n)*"
                       "colloc0 is stopped; the others keep running"):
        launcher.restart("colloc0", run_dir, timeout_s=20, echo=lambda _: None)
    states = {r["name"]: r["state"] for r in launcher.status(run_dir)}
    assert states.pop("colloc0") == "dead" and set(states.values()) == {"healthy"}
    (run_dir.parent / "standin-colloc0").unlink()
    assert launcher.restart("colloc0", run_dir, timeout_s=20, echo=lambda _: None)["healthy"]


def test_down_kills_a_service_that_ignores_sigterm(mesh, monkeypatch):
    config, run_dir = mesh
    monkeypatch.setenv("STANDIN_GATEWAY", "stubborn")
    launcher.up(config, run_dir, timeout_s=20, echo=lambda _: None)
    pids = _pids(run_dir)
    how = {r["name"]: r["how"] for r in launcher.down(run_dir, timeout_s=0.5)}
    assert how["gateway"] == "killed" and how["router"] == "stopped"
    assert not any(running(p) for p in pids.values())
    assert list(status_dir(run_dir).glob("*.json")) == []


def test_cli_up_status_json_restart_logs_down(mesh):
    config, run_dir = mesh
    cli = CliRunner()
    where = ["--run-dir", str(run_dir)]
    result = cli.invoke(main, ["up", "--config", config, *where, "--timeout", "20"])
    assert result.exit_code == 0, result.output
    assert "tcp://127.0.0.1:5555" in result.output and "http://127.0.0.1:8000/v1" in result.output
    result = cli.invoke(main, ["status", "--json", "--check", *where])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["name"]: (r["role"], r["device"], r["healthy"]) for r in rows}["prefill0"] == (
        "prefill", "cpu", True)
    assert all(isinstance(r["pid"], int) for r in rows)
    result = cli.invoke(main, ["status", *where])
    assert "prefill0" in result.output and "healthy" in result.output
    result = cli.invoke(main, ["up", "--config", config, *where])
    assert result.exit_code != 0 and "already running" in result.output
    result = cli.invoke(main, ["restart", "nosuch", *where])
    assert result.exit_code != 0 and "no service named 'nosuch'" in result.output
    result = cli.invoke(main, ["restart", "router", *where, "--timeout", "20"])
    assert result.exit_code == 0 and "router healthy" in result.output, result.output
    result = cli.invoke(main, ["logs", "colloc0", "-n", "1", *where])
    assert result.output.startswith("standin colloc0 threads=")
    result = cli.invoke(main, ["down", *where])
    assert result.exit_code == 0 and result.output.count("stopped") == 5
    result = cli.invoke(main, ["status", "--check", *where])
    assert result.exit_code == 1 and "no mesh" in result.output


def test_threads_split_the_cores_among_cpu_workers():
    cfg = MeshConfig(workers=[WorkerConfig("a", "collocated"), WorkerConfig("p", "prefill"),
                              WorkerConfig("d", "decode", threads=5)])
    assert worker_threads(cfg, 2) == {"a": 1, "p": 1, "d": 5}
    assert worker_threads(cfg, 16) == {"a": 5, "p": 5, "d": 5}
    gpu = MeshConfig(workers=[WorkerConfig("p", "prefill", "cuda:0"),
                              WorkerConfig("d", "decode", "cuda:1")])
    assert worker_threads(gpu, 16) == {"p": 8, "d": 8}
    specs = plan(cfg, Path("/r/mesh.toml"), lambda m: ["py", "-m", m], num_cores=16)
    assert [s.argv for s in specs][1:3] == [
        ["py", "-m", "services.worker", "--config", "/r/mesh.toml", "--name", "a"],
        ["py", "-m", "services.worker", "--config", "/r/mesh.toml", "--name", "p"]]
    assert specs[1].env == {"NANOPD_THREADS": "5", "OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}


def test_mesh_toml_round_trips():
    cfg = MeshConfig(model="/m/q \"x\"", run_dir="/tmp/r", strategy="collocated",
                     gateway_zmq="tcp://0.0.0.0:6000", heartbeat_s=0.25,
                     workers=[WorkerConfig("c0", "collocated", "cuda:1", threads=2,
                                           engine={"block_size": 32, "enforce_eager": True}),
                              WorkerConfig("p0", "prefill"), WorkerConfig("d0", "decode")])
    text = dump_toml(cfg)
    assert MeshConfig.from_dict(tomllib.loads(text)) == cfg


def test_up_rejects_a_run_dir_too_long_for_unix_sockets(tmp_path):
    config = tmp_path / "mesh.toml"
    config.write_text(CONFIG)
    with pytest.raises(ValueError, match="too long for unix sockets"):
        launcher.up(str(config), tmp_path / ("x" * 120), echo=lambda _: None)


def test_the_deploy_example_config_loads_for_cpu_and_for_gpu():
    text = (Path(__file__).parents[2] / "deploy" / "mesh.example.toml").read_text()
    cpu = MeshConfig.from_dict(tomllib.loads(text))
    assert [(w.name, w.role, w.device) for w in cpu.workers] == [
        ("colloc0", "collocated", "cpu"), ("prefill0", "prefill", "cpu"),
        ("decode0", "decode", "cpu")]
    head, gpu_part = text.split("# ---- GPU variant")
    head = head.split("# ---- CPU")[0]
    gpu_lines = [line.removeprefix("#").removeprefix(" ") for line in gpu_part.splitlines()[4:]]
    gpu = MeshConfig.from_dict(tomllib.loads(head + "\n".join(gpu_lines)))
    assert [(w.role, w.device) for w in gpu.workers] == [
        ("prefill", "cuda:0"), ("prefill", "cuda:1"), ("decode", "cuda:2"), ("decode", "cuda:3")]
    assert gpu.workers[0].engine["dtype"] == "bfloat16"
