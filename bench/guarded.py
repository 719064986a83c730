"""Run a benchmark child that may crash or hang, and always end with a JSON result.

The child writes its JSON to `out` as it goes, through Progress (status "running" until it
finishes, one entry in "rows" per measurement, a row that failed has an "error" key). The
parent (run_guarded) streams the child's output, kills the child's whole process group after
`timeout_s` or on its own SIGTERM (an outer `timeout`), and then records in that JSON how the
child ended: exit code, signal, timeout and the last lines of its output. The parent needs no
torch, so it survives whatever the child's imports do.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def short_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {' | '.join(lines[:3])[:600]}"


class Progress:
    """The child's side: the result being built, written to disk after every update."""

    def __init__(self, path: Path, bench: str, args: dict):
        self.path = path
        self.result: dict = {
            "bench": bench, "date": datetime.date.today().isoformat(), "status": "running",
            "stage": "start", "stages": [], "rows": [], "args": args,
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.result)

    def stage(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) as one named stage; on failure record it and re-raise."""
        self.result["stage"] = name
        self.save()
        print(f"[{self.result['bench']}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn(*args)
        except BaseException as e:
            self.result["stages"].append({"stage": name, "ok": False, "error": short_error(e),
                                          "s": round(time.perf_counter() - t0, 2)})
            self.result.update(status="failed", error=f"{name}: {short_error(e)}")
            self.result["traceback"] = traceback.format_exc()[-3000:]
            self.save()
            raise
        self.result["stages"].append({"stage": name, "ok": True,
                                      "s": round(time.perf_counter() - t0, 2)})
        self.save()
        return value


def write_json(path: Path, result: dict) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def run_guarded(cmd: list[str], out: Path, timeout_s: float, bench: str) -> dict:
    """Run `cmd`, then return (and write to `out`) its result with a "child" entry added."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip()[:400])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = terminated = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # an outer `timeout` ran out
    try:
        rc = proc.wait(timeout=timeout_s)
    except (subprocess.TimeoutExpired, _Terminated) as e:
        timed_out, terminated = True, isinstance(e, _Terminated)
        with contextlib.suppress(ProcessLookupError):  # it may have just ended by itself
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started (compilers)
        rc = proc.wait(timeout=30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    reader.join(timeout=5)
    out.with_name(out.name + ".tmp").unlink(missing_ok=True)  # a write the kill cut short
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        result = {"bench": bench, "status": "failed", "rows": [],
                  "error": f"the child wrote no readable JSON ({type(e).__name__}: {e})"}
    child = {"rc": rc, "timed_out": timed_out, "terminated": terminated,
             "wall_s": round(time.monotonic() - t0, 1), "log_tail": list(tail)}
    if rc < 0:
        child["signal"] = signal.Signals(-rc).name
    result["child"] = child
    if rc != 0 or timed_out or result.get("status") == "running":
        why = ("stopped by SIGTERM" if terminated else "timed out" if timed_out
               else f"exit {child.get('signal', rc)}")
        early = f"the child ended early ({why}) in stage {result.get('stage', 'start')!r}"
        result["error"] = "; ".join(x for x in (early, result.get("error")) if x)
        done = any("error" not in r for r in result.get("rows", []))
        result["status"] = "partial" if done else "failed"
    write_json(out, result)
    return result
