"""Run a script of bad calls straight to the extension in a child process: a crash (the
bindings once died of C++ exceptions) fails the test instead of killing pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# what every script of bad calls starts with: the extension, bf16 on the GPU, an empty tensor
PRELUDE = """
import torch
from services.worker.ops import cuda_ops
ops = cuda_ops._ops()
bf = {"dtype": torch.bfloat16, "device": "cuda"}
none = torch.empty(0, device="cuda")
no_norm = (none, none, 0.0)  # a fused GEMV's norm_sums, norm_weight, eps: no NORM prologue
"""


def errors_of(script: str) -> list[str]:
    """The `|`-joined error strings the script prints last, after asserting it exited 0."""
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1].split("|")
