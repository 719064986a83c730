"""Service status files: `<run_dir>/status/<name>.json`, written when a service is ready.

A service is healthy when its status file exists, its pid is alive, and its `updated`
timestamp is recent (services refresh it every heartbeat). `nanopd status` reads these.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STALE_S = 30.0  # a CPU worker busy with a long prefill step still counts as alive


def status_dir(run_dir: Path) -> Path:
    d = Path(run_dir) / "status"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_status(run_dir: Path, name: str, **info: Any) -> None:
    """Atomically (re)write this service's status file."""
    path = status_dir(run_dir) / f"{name}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"name": name, "pid": os.getpid(), "updated": time.time(), **info}))
    os.replace(tmp, path)


def clear_status(run_dir: Path, name: str) -> None:
    path = status_dir(run_dir) / f"{name}.json"
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every service's last status, with `healthy` computed now."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(status_dir(run_dir).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        info["healthy"] = pid_alive(info.get("pid", -1)) and (
            time.time() - info.get("updated", 0) < STALE_S
        )
        out[info.get("name", path.stem)] = info
    return out
