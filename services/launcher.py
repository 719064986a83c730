"""Start, watch and stop the mesh on one host: every service is its own OS process.

A run dir holds everything of one mesh:
    mesh.toml        the config every service reads (and `restart` reuses)
    launcher.json    what was started: command line, environment, pid per service
    logs/NAME.log    each service's stdout and stderr
    status/NAME.json written by the service itself when ready, refreshed every heartbeat
    *.sock           the services' ipc sockets
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.config import MeshConfig
from common.health import read_status, status_dir
from services import launcher_proc as proc
from services.launcher_config import (
    Program,
    check_socket_paths,
    endpoints,
    plan,
    python_module,
    service_env,
    summary,
    write_mesh_toml,
)

RECORD = "launcher.json"
UP_TIMEOUT_S = 300.0  # CPU workers load a model before they report healthy
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20

default_program: Program = python_module  # tests swap in stand-in services
Echo = Callable[[str], None]


class LaunchError(RuntimeError):
    """The mesh (or one service) could not be started, found or stopped; the text says why."""


def up(config_path: str | None = None, run_dir: str | Path | None = None,
       timeout_s: float = UP_TIMEOUT_S, program: Program | None = None,
       echo: Echo = print) -> dict[str, Any]:
    """Start every service of the config, wait until all are healthy, return the mesh's
    endpoints and status. On failure, stops whatever it started and raises LaunchError."""
    cfg = MeshConfig.load(config_path)
    run_path = Path(run_dir).expanduser().resolve() if run_dir else cfg.run_path.resolve()
    cfg.run_dir = str(run_path)
    check_socket_paths(cfg)
    try:
        run_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaunchError(f"cannot create the run dir {run_path}: {e}; choose another "
                          "--run-dir (or NANOPD_RUN_DIR)") from e
    with _lock(run_path):
        busy = _running(run_path)
        if busy:
            raise LaunchError(
                f"a mesh is already running in {run_path}: {', '.join(busy)}; "
                f"stop it with `nanopd down --run-dir {run_path}` or choose another --run-dir"
            )
        _clean(run_path, [])
        mesh_path = write_mesh_toml(cfg, run_path, config_path)
        specs = plan(cfg, mesh_path, program or default_program)
        record: dict[str, Any] = {
            "config": str(mesh_path), "source": config_path, "cwd": os.getcwd(),
            "env": service_env(), "endpoints": endpoints(cfg), "services": [],
        }
        try:
            for spec in specs:
                svc = {"name": spec.name, "role": spec.role, "device": spec.device,
                       "argv": spec.argv, "env": spec.env}
                record["services"].append(svc)
                _spawn(run_path, record, svc, append=False)
                _save(run_path, record)
                threads = spec.env.get("NANOPD_THREADS", "?")
                echo(f"started {spec.name:<10} pid {svc['pid']:<7} {spec.role} on {spec.device}"
                     f" ({threads} thread{'s' if threads != '1' else ''})")
            _wait_healthy(run_path, record["services"], timeout_s, echo)
        except BaseException as e:
            _teardown(run_path, record["services"])
            if isinstance(e, LaunchError):
                raise LaunchError(f"{e}\nstopped everything this `up` started; "
                                  f"logs are in {run_path / 'logs'}") from None
            raise
    info = {"run_dir": str(run_path), "config": str(mesh_path),
            "endpoints": record["endpoints"], "services": status(run_path)}
    for line in summary(info):
        echo(line)
    return info


def down(run_dir: str | Path, timeout_s: float = STOP_TIMEOUT_S) -> list[dict[str, Any]]:
    """SIGTERM every service (its whole process group), SIGKILL those left after `timeout_s`,
    remove their status files. Returns [{name, pid, how}]; [] if nothing was started here."""
    run_path = Path(run_dir).expanduser().resolve()
    record = _load(run_path) if run_path.is_dir() else None
    if record is None:
        if run_path.is_dir():
            _clean(run_path, [])
        return []
    return _teardown(run_path, record["services"], timeout_s)


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per service: name, pid, role, device, healthy, state (healthy | starting |
    unhealthy | dead), log. Services with a status file but not started here are listed too."""
    run_path = Path(run_dir).expanduser().resolve()
    if not run_path.is_dir():
        return []
    record = _load(run_path) or {"services": []}
    reports = read_status(run_path)
    rows = []
    for svc in record["services"]:
        info = reports.pop(svc["name"], None)
        alive = proc.running(svc.get("pid", 0), svc.get("ticks", 0))
        healthy = bool(alive and info and info["healthy"]
                       and proc.same_session(info.get("pid", -1), svc["pid"]))
        state = ("healthy" if healthy else "dead" if not alive
                 else "starting" if info is None else "unhealthy")
        rows.append({"name": svc["name"], "pid": svc.get("pid"), "role": svc["role"],
                     "device": svc["device"], "healthy": healthy, "state": state,
                     "log": str(_log_file(run_path, svc["name"]))})
    for name, info in reports.items():
        rows.append({"name": name, "pid": info.get("pid"), "role": info.get("role", "?"),
                     "device": info.get("device", "?"), "healthy": info["healthy"],
                     "state": "healthy" if info["healthy"] else "unhealthy", "log": None})
    return rows


def restart(name: str, run_dir: str | Path, timeout_s: float = UP_TIMEOUT_S,
            echo: Echo = print) -> dict[str, Any]:
    """Stop one service and start it again with the same command line and environment while
    the others keep running; wait until it is healthy. Returns its status row."""
    run_path = Path(run_dir).expanduser().resolve()
    with _lock(run_path):
        record = _load(run_path)
        if record is None:
            raise LaunchError(f"no mesh was started in {run_path}; start one with `nanopd up`")
        svc = next((s for s in record["services"] if s["name"] == name), None)
        if svc is None:
            names = ", ".join(s["name"] for s in record["services"])
            raise LaunchError(f"no service named {name!r} in {run_path}; services: {names}")
        how = proc.stop({name: (svc["pid"], svc["ticks"])}, STOP_TIMEOUT_S)[name]
        echo(f"{name}: pid {svc['pid']} {how}")
        _remove_status(run_path, [name])
        _spawn(run_path, record, svc, append=True)
        _save(run_path, record)
        echo(f"started {name} again, pid {svc['pid']}")
        try:
            _wait_healthy(run_path, [svc], timeout_s, echo)
        except BaseException as e:
            proc.stop({name: (svc["pid"], svc["ticks"])}, STOP_TIMEOUT_S)
            _remove_status(run_path, [name])
            if isinstance(e, LaunchError):
                raise LaunchError(f"{e}\n{name} is stopped; the others keep running") from None
            raise
    return next(row for row in status(run_path) if row["name"] == name)


def log_path(name: str, run_dir: str | Path) -> Path:
    run_path = Path(run_dir).expanduser().resolve()
    path = _log_file(run_path, name)
    if not path.exists():
        known = sorted(p.stem for p in (run_path / "logs").glob("*.log"))
        raise LaunchError(f"no log for {name!r} in {run_path / 'logs'}; "
                          f"logs: {', '.join(known) or 'none (was the mesh ever up here?)'}")
    return path


def logs(name: str, run_dir: str | Path, num_lines: int = 50) -> list[str]:
    """The last `num_lines` lines of the service's log."""
    return proc.tail(log_path(name, run_dir), num_lines)


def follow(name: str, run_dir: str | Path) -> Iterator[str]:
    """Lines as the service writes them, until the caller stops iterating."""
    return proc.follow(log_path(name, run_dir))


# ---- internals
def _spawn(run_path: Path, record: dict[str, Any], svc: dict[str, Any], append: bool) -> None:
    try:
        pid, ticks = proc.start(svc["argv"], {**record["env"], **svc["env"]},
                                _log_file(run_path, svc["name"]), record["cwd"], append=append)
    except OSError as e:
        raise LaunchError(f"cannot start {svc['name']} ({' '.join(svc['argv'])}): {e}") from e
    svc.update(pid=pid, ticks=ticks, started=time.time())


def _wait_healthy(run_path: Path, services: list[dict[str, Any]], timeout_s: float,
                  echo: Echo) -> None:
    t0 = time.monotonic()
    pending = {s["name"]: s for s in services}
    while pending:
        reports = read_status(run_path)
        for name, svc in list(pending.items()):
            if not proc.running(svc["pid"], svc["ticks"]):
                code = proc.exit_code(svc["pid"])
                how = "exited" if code is None else f"exited with code {code}"
                raise LaunchError(f"{name} {how} before it became healthy\n"
                                  + _tails(run_path, [svc]))
            info = reports.get(name)
            if info and info["healthy"] and proc.same_session(info.get("pid", -1), svc["pid"]):
                echo(f"{name} is healthy after {time.monotonic() - t0:.1f} s")
                del pending[name]
        if pending and time.monotonic() - t0 > timeout_s:
            raise LaunchError(
                f"timed out after {timeout_s:g} s waiting for {', '.join(pending)} to become "
                f"healthy (no fresh status file in {run_path / 'status'})\n"
                + _tails(run_path, list(pending.values()))
            )
        if pending:
            time.sleep(0.1)


def _tails(run_path: Path, services: list[dict[str, Any]]) -> str:
    parts = []
    for svc in services:
        path = _log_file(run_path, svc["name"])
        lines = proc.tail(path, LOG_TAIL_LINES)
        parts.append(f"--- {svc['name']} (pid {svc['pid']}), last {len(lines)} lines of {path}:")
        parts += [f"    {line}" for line in lines]
    return "\n".join(parts)


def _teardown(run_path: Path, services: list[dict[str, Any]],
              timeout_s: float = STOP_TIMEOUT_S) -> list[dict[str, Any]]:
    started = [s for s in services if "pid" in s]
    how = proc.stop({s["name"]: (s["pid"], s["ticks"]) for s in started}, timeout_s)
    _clean(run_path, [s["name"] for s in services])
    return [{"name": s["name"], "pid": s["pid"], "how": how[s["name"]]} for s in started]


def _running(run_path: Path) -> list[str]:
    """'name (pid N)' of every service still running in this run dir."""
    record = _load(run_path) or {"services": []}
    busy = [f"{s['name']} (pid {s['pid']})" for s in record["services"]
            if proc.running(s.get("pid", 0), s.get("ticks", 0))]
    known = {s["name"] for s in record["services"]}
    busy += [f"{name} (pid {info.get('pid')})" for name, info in read_status(run_path).items()
             if info["healthy"] and name not in known]
    return busy


def _clean(run_path: Path, names: list[str]) -> None:
    """Drop the record, the sockets, the status files of `names` and any stale ones."""
    (run_path / RECORD).unlink(missing_ok=True)
    for sock in run_path.glob("*.sock"):
        sock.unlink(missing_ok=True)
    stale = [n for n, info in read_status(run_path).items() if not info["healthy"]]
    _remove_status(run_path, names + stale)


def _remove_status(run_path: Path, names: list[str]) -> None:
    for name in names:
        (status_dir(run_path) / f"{name}.json").unlink(missing_ok=True)


def _log_file(run_path: Path, name: str) -> Path:
    return run_path / "logs" / f"{name}.log"


def _load(run_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_path / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LaunchError(f"cannot read {run_path / RECORD}: {e}; remove it if no mesh runs "
                          "there") from e


def _save(run_path: Path, record: dict[str, Any]) -> None:
    path = run_path / RECORD
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the environment
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(run_path: Path) -> Iterator[None]:
    run_path.mkdir(parents=True, exist_ok=True)
    with open(run_path / ".launcher.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LaunchError(f"another `nanopd up` or `nanopd restart` is working in {run_path};"
                              " wait for it to finish") from None
        yield
