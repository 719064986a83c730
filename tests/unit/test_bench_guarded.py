"""bench/guarded.py: a child that finishes, crashes, hangs or writes nothing still ends in JSON."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_guarded", ROOT / "bench" / "guarded.py")
guarded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guarded)

# The child writes "running" with one finished row, then does what `tail` says.
CHILD = """
import json, os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
out.write_text(json.dumps({"bench": "t", "status": "running", "stage": "row 2",
                           "rows": [{"x": 1}]}))
{tail}
"""


def run_child(tmp_path: Path, tail: str, timeout_s: float = 60.0) -> dict:
    out = tmp_path / "out" / "r.json"
    cmd = [sys.executable, "-c", CHILD.replace("{tail}", tail), str(out)]
    result = guarded.run_guarded(cmd, out, timeout_s, "t")
    assert json.loads(out.read_text()) == result
    return result


def test_finished_child_keeps_its_status(tmp_path):
    r = run_child(tmp_path, 'out.write_text(json.dumps({"status": "ok", "rows": [{"x": 1}]}))')
    assert r["status"] == "ok" and "error" not in r
    assert r["child"]["rc"] == 0 and not r["child"]["timed_out"]


def test_crash_is_recorded_with_its_signal_and_the_rows_so_far(tmp_path):
    r = run_child(tmp_path, 'print("about to crash", flush=True); os.kill(os.getpid(), 11)')
    assert r["child"]["signal"] == "SIGSEGV"
    assert r["status"] == "partial" and r["rows"] == [{"x": 1}]
    assert "SIGSEGV" in r["error"] and "row 2" in r["error"]
    assert "about to crash" in r["child"]["log_tail"]


def test_hang_is_killed_and_recorded(tmp_path):
    r = run_child(tmp_path, "time.sleep(600)", timeout_s=1.0)
    assert r["child"]["timed_out"] and r["status"] == "partial"
    assert "timed out" in r["error"]


def test_child_without_json_gives_a_failed_result(tmp_path):
    out = tmp_path / "r.json"
    r = guarded.run_guarded([sys.executable, "-c", "raise SystemExit(3)"], out, 60.0, "t")
    assert r["status"] == "failed" and r["child"]["rc"] == 3
    assert "no readable JSON" in r["error"] and r["rows"] == []


def test_error_row_does_not_count_as_a_result(tmp_path):
    r = run_child(tmp_path, 'out.write_text(json.dumps({"status": "running", '
                            '"rows": [{"error": "boom"}]})); sys.exit(1)')
    assert r["status"] == "failed"


def test_sigterm_to_the_parent_kills_the_child_and_still_records(tmp_path):
    import os
    import signal
    import threading
    import time

    def term_once_the_child_runs() -> None:  # the child writes its JSON after it started
        for _ in range(600):
            if (tmp_path / "out" / "r.json").exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=term_once_the_child_runs, daemon=True).start()
    r = run_child(tmp_path, "time.sleep(600)")
    assert r["child"]["terminated"] and "SIGTERM" in r["error"]
    assert r["status"] == "partial"


def test_progress_records_a_failed_stage_and_reraises(tmp_path):
    import pytest

    p = guarded.Progress(tmp_path / "r.json", "t", {"a": 1})
    assert p.stage("first", lambda x: x + 1, 1) == 2
    with pytest.raises(ValueError):
        p.stage("second", lambda: int("not a number"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert [s["ok"] for s in r["stages"]] == [True, False]
    assert r["status"] == "failed" and r["stage"] == "second"
    assert r["error"].startswith("second: ValueError") and r["args"] == {"a": 1}
