"""What `nanopd up` starts: one command line and environment per service, and the mesh.toml
in the run dir that every service (and a later `nanopd restart`) reads.

Conventions every service honours (see deploy/README.md):
- `python -m services.<router|gateway|worker> --config RUN_DIR/mesh.toml [--name WORKER]`
- `NANOPD_THREADS=<n>`: the service calls `torch.set_num_threads(n)`; OMP_NUM_THREADS and
  MKL_NUM_THREADS carry the same value for the native pools.
- `PYTHONUNBUFFERED=1`: stdout/stderr reach the log file line by line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, MeshConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
MESH_FILE = "mesh.toml"
MAX_IPC_PATH = 100  # a unix socket path must fit sockaddr_un (108 bytes with the NUL)

Program = Callable[[str], list[str]]  # a module ("services.router") -> the argv that runs it


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


@dataclass
class ServiceSpec:
    name: str
    role: str  # router | gateway | collocated | prefill | decode
    device: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the launcher's environment


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(cfg: MeshConfig, num_cores: int) -> dict[str, int]:
    """Torch threads per worker: its `threads` setting, else an equal share of the cores among
    the workers that compute on the CPU (GPU workers share the cores among all workers)."""
    num_cpu_workers = sum(w.device == "cpu" for w in cfg.workers)
    out: dict[str, int] = {}
    for w in cfg.workers:
        sharers = num_cpu_workers if w.device == "cpu" else len(cfg.workers)
        out[w.name] = w.threads or max(1, num_cores // max(1, sharers))
    return out


def thread_env(num_threads: int) -> dict[str, str]:
    n = str(num_threads)
    return {"NANOPD_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def plan(cfg: MeshConfig, mesh_path: Path, program: Program = python_module,
         num_cores: int | None = None) -> list[ServiceSpec]:
    """The services of `cfg` in start order: router, workers, gateway."""
    threads = worker_threads(cfg, num_cores or available_cores())
    conf = ["--config", str(mesh_path)]
    # router and gateway do little arithmetic: one thread each leaves the cores to the workers
    specs = [ServiceSpec("router", "router", "cpu", program("services.router") + conf,
                         thread_env(1))]
    for w in cfg.workers:
        specs.append(ServiceSpec(w.name, w.role, w.device,
                                 program("services.worker") + conf + ["--name", w.name],
                                 thread_env(threads[w.name])))
    specs.append(ServiceSpec("gateway", "gateway", "cpu", program("services.gateway") + conf,
                             thread_env(1)))
    return specs


def service_env() -> dict[str, str]:
    """This process's environment, plus what every service needs."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def summary(info: dict[str, Any]) -> list[str]:
    """What `nanopd up` prints once the mesh is healthy: where to reach it, how to stop it."""
    run_path = Path(info["run_dir"])
    where = "" if run_path == MeshConfig().run_path.resolve() else f" --run-dir {run_path}"
    ep = info["endpoints"]
    return [f"mesh up in {run_path} ({len(info['services'])} services, config {info['config']})",
            f"  zmq   {ep['zmq']:<28} nanopd submit{where} \"What is the capital of France?\"",
            f"  http  {ep['http']:<28} OpenAI-compatible: examples/openai_client.py",
            f"  logs  {run_path / 'logs'}/NAME.log  nanopd logs{where} NAME -f",
            f"  stop  nanopd down{where}"]


def resolve_run_dir(run_dir: str | None, config_path: str | None) -> Path:
    """--run-dir (or NANOPD_RUN_DIR) wins; else the config's `run_dir`; else the default."""
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    if config_path:
        return MeshConfig.load(config_path).run_path.resolve()
    return MeshConfig().run_path.resolve()


def endpoints(cfg: MeshConfig) -> dict[str, str]:
    http = cfg.gateway_http if "://" in cfg.gateway_http else f"http://{cfg.gateway_http}"
    return {"zmq": cfg.gateway_zmq, "http": f"{http.rstrip('/')}/v1"}


def check_socket_paths(cfg: MeshConfig) -> None:
    names = ["router", "gateway"] + [f"worker-{w.name}" for w in cfg.workers]
    longest = max((cfg.ipc(n) for n in names), key=len).removeprefix("ipc://")
    if len(longest) > MAX_IPC_PATH:
        raise ConfigError(
            f"run_dir {cfg.run_dir} is too long for unix sockets ({longest} has {len(longest)} "
            f"characters; the limit is {MAX_IPC_PATH}); choose a shorter --run-dir"
        )


def write_mesh_toml(cfg: MeshConfig, run_path: Path, source: str | None) -> Path:
    """`cfg` with its run_dir made absolute, as TOML in `run_path/mesh.toml` (atomically)."""
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(run_path)
    path = run_path / MESH_FILE
    header = f"# written by `nanopd up` from {source or 'the default config'}; restart reads it\n"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(header + dump_toml(cfg))
    os.replace(tmp, path)
    return path


def dump_toml(cfg: MeshConfig) -> str:
    """The TOML that `MeshConfig.load` reads back into an equal config."""
    top: list[str] = []
    gateway: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "workers" or value is None:
            continue
        if f.name.startswith("gateway_"):
            gateway.append(f"{_key(f.name.removeprefix('gateway_'))} = {_value(value)}")
        else:
            top.append(f"{_key(f.name)} = {_value(value)}")
    lines = top + ["", "[gateway]"] + gateway
    for w in cfg.workers:
        lines += ["", "[[workers]]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in dataclasses.asdict(w).items()
                  if v is not None]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else _str(key)


def _str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # JSON's escapes are a subset of TOML's


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} value {v!r} as TOML")
