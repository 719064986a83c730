"""Process primitives for the launcher: start a service in its own session, tell whether a
recorded pid is still that service, stop process groups, read log tails."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from common.health import pid_alive

HAVE_PROC = Path("/proc/self/stat").exists()
_CHILDREN: dict[int, subprocess.Popen] = {}  # started by this process: polled, so reaped


def start(argv: list[str], env: dict[str, str], log_path: Path, cwd: str,
          append: bool = False) -> tuple[int, int]:
    """Start `argv` as the leader of a new session, output to `log_path`; (pid, start ticks)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} nanopd starts: "
                  f"{shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    return proc.pid, start_ticks(proc.pid)


def start_ticks(pid: int) -> int:
    """The process's start time (clock ticks since boot), or 0 where /proc can't tell."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else 0


def exit_code(pid: int) -> int | None:
    """The exit code of a process this launcher started and that has exited, else None."""
    proc = _CHILDREN.get(pid)
    return None if proc is None else proc.poll()


def running(pid: int, ticks: int = 0) -> bool:
    """True while `pid` runs (not a zombie) and, if `ticks` is known, is still the process
    that was started then (not a reused pid)."""
    if pid <= 0:
        return False
    proc = _CHILDREN.get(pid)
    if proc is not None:
        return proc.poll() is None
    if not HAVE_PROC:
        return pid_alive(pid)
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return not ticks or int(fields[19]) == ticks


def same_session(status_pid: int, leader_pid: int) -> bool:
    """Whether the pid a status file names belongs to the service started as `leader_pid`."""
    if status_pid == leader_pid:
        return True
    try:
        return os.getsid(status_pid) == leader_pid
    except OSError:
        return False


def stop(procs: dict[str, tuple[int, int]], timeout_s: float) -> dict[str, str]:
    """SIGTERM each (pid, ticks) process group, SIGKILL those still alive after `timeout_s`.
    Returns how each ended: "stopped", "killed" or "not running"."""
    how: dict[str, str] = {}
    live: dict[str, int] = {}
    for name, (pid, ticks) in procs.items():
        if running(pid, ticks) and _signal_group(pid, signal.SIGTERM):
            live[name] = pid
            how[name] = "stopped"
        else:
            how[name] = "not running"
    deadline = time.monotonic() + timeout_s
    while any(running(p) for p in live.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for name, pid in live.items():
        if running(pid):
            how[name] = "killed"
        _signal_group(pid, signal.SIGKILL)  # the leader and whatever it left in its group
    deadline = time.monotonic() + 5.0
    while any(running(p) for p in live.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in live.values():
        _CHILDREN.pop(pid, None)
    return how


def tail(path: Path, num_lines: int) -> list[str]:
    """The last `num_lines` lines of a text file ([] if there is none)."""
    if num_lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            nbytes = 128 * num_lines
            while True:
                f.seek(max(0, size - nbytes))
                data = f.read()
                if nbytes >= size or data.count(b"\n") > num_lines:
                    break
                nbytes *= 4
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-num_lines:]


def follow(path: Path, poll_s: float = 0.2) -> Iterator[str]:
    """New lines appended to `path` from now on, forever (a truncated file restarts at 0)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pending = b""
        while True:
            chunk = f.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
                continue
            if os.fstat(f.fileno()).st_size < f.tell():
                f.seek(0)
            time.sleep(poll_s)


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()
