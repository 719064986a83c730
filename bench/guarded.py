"""Run a benchmark child that may crash or hang, and always end with a JSON result.

The child writes its JSON to `out` as it goes (status "running" until it finishes, one entry
in "rows" per measurement, a row that failed has an "error" key). The parent streams the
child's output, kills the child's whole process group after `timeout_s`, and then records in
that JSON how the child ended: exit code, signal, timeout and the last lines of its output.
A SIGTERM to the parent (an outer `timeout`) kills the child the same way before it records.
Needs no torch, so it survives whatever the child's imports do.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


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
