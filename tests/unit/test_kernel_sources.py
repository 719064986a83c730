"""csrc/'s CUDA sources compile with nvcc alone (no torch, no GPU), and the decode step's
kernels keep the registers their occupancy depends on (docs/kernels.md, "Resources").
Skipped where there is no nvcc. ptxas's counts are for sm_90, the build's target."""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")

pytestmark = [pytest.mark.skipif(NVCC is None, reason="needs nvcc"), pytest.mark.slow]

# mangled-name pattern (both dtypes) -> (most registers, why)
BUDGETS = {
    # gate_up_proj at one row: 3 blocks an SM of 128 threads need <= 168 registers
    r"gemv_stream_kernelI(13__nv_bfloat16|6__half)Li6ELi1ELb1E": (168, "3 blocks an SM"),
    # o_proj at one row (the ADD epilogue, 8 pieces a round): 4 blocks an SM
    r"gemv_fused_kernelI(13__nv_bfloat16|6__half)Li1ELi2ELi3ELb0ELi0E": (128, "4 blocks an SM"),
    # down_proj at one row (16 pieces a round): its 192 blocks in one wave at 2 an SM
    r"gemv_fused_kernelI(13__nv_bfloat16|6__half)Li1ELi2ELi3ELb0ELi16E": (255, "2 blocks an SM"),
    # down_proj of the 1.5B shape (k 8960: 18 pieces a round, 2 rounds, not 3)
    r"gemv_fused_kernelI(13__nv_bfloat16|6__half)Li1ELi2ELi3ELb0ELi18E": (255, "2 blocks an SM"),
    # qkv_proj + norm + rotary at one row: __launch_bounds__(128, 3)
    r"gemv_fused_kernelI(13__nv_bfloat16|6__half)Li1ELi2ELi2ELb1ELi0E": (168, "3 blocks an SM"),
    # decode attention, head_dim 128, groups <= 8, 4 warps: 2 blocks an SM are set by shared
    # memory; 8 warps: 1 block an SM
    r"paged_decode_kernelI(13__nv_bfloat16|6__half)Li128ELi8ELi4E": (255, "no spill"),
    r"paged_decode_kernelI(13__nv_bfloat16|6__half)Li128ELi8ELi8E": (255, "no spill"),
}


def _compile(name: str, tmp: Path) -> tuple[str, int, str]:
    cmd = [NVCC, "-arch=sm_90", "-O3", "-Xptxas", "-v", "-c", str(CSRC / name),
           "-o", str(tmp / f"{name}.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return name, done.returncode, done.stdout + done.stderr


def _kernels(ptxas: str) -> dict[str, tuple[int, str]]:
    """entry function -> (registers, its spill line)."""
    out, name, spill = {}, None, ""
    for line in ptxas.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name, spill = m.group(1), ""
        elif "bytes spill" in line:
            spill = line.strip()
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            out[name] = (int(m.group(1)), spill)
            name = None
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[int, str]]:
    from csrc.build import SOURCES

    tmp = tmp_path_factory.mktemp("nvcc")
    cu = [s for s in SOURCES if s.endswith(".cu")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: _compile(s, tmp), cu))
    failed = {name: log[-2000:] for name, rc, log in results if rc != 0}
    assert not failed, failed
    warned = {name: [line for line in log.splitlines() if "warning" in line]
              for name, _, log in results}
    assert not any(warned.values()), warned
    kernels: dict[str, tuple[int, str]] = {}
    for _, _, log in results:
        kernels.update(_kernels(log))
    return kernels


def test_every_cuda_source_compiles_without_torch_or_warnings(compiled):
    assert any("paged_decode_kernel" in k for k in compiled)
    assert any("gemv_stream_kernel" in k for k in compiled)


@pytest.mark.parametrize("pattern", BUDGETS)
def test_decode_step_kernels_keep_their_register_budgets(compiled, pattern):
    most, why = BUDGETS[pattern]
    found = {k: v for k, v in compiled.items() if re.search(pattern, k)}
    assert len(found) == 2, f"{pattern}: expected the bf16 and fp16 kernels, got {list(found)}"
    for kernel, (registers, spill) in found.items():
        assert registers <= most, f"{kernel}: {registers} registers > {most} ({why})"
        assert spill.endswith("0 bytes spill stores, 0 bytes spill loads"), f"{kernel}: {spill}"


def test_the_boundary_probe_compiles(tmp_path):
    """bench/boundary_probe.cu, a standalone program run on the device (bench/results)."""
    probe = CSRC.parent / "bench" / "boundary_probe.cu"
    done = subprocess.run([NVCC, "-arch=sm_90", "-O3", "-o", str(tmp_path / "probe"),
                           str(probe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "warning" not in done.stdout + done.stderr, done.stderr
