"""Build the CUDA kernels of csrc/ into build/kernels/ (`make kernels`, on a GPU machine).

torch.utils.cpp_extension.load compiles with nvcc and ninja, rebuilding only what changed;
the result, build/kernels/nanopd_kernels.so, is what services/worker/ops/cuda_ops.py imports
(nothing ever compiles at import). TORCH_CUDA_ARCH_LIST defaults to 9.0 (H100, H200); set it
for other cards (the kernels need 8.0 or later: mma.sync bf16, cp.async).

    python3 csrc/build.py                 # build (or check it is up to date)
    python3 csrc/build.py --ptxas-info    # also print registers / spills per kernel
    python3 csrc/build.py --variant s4 -D NANOPD_DECODE_STAGES=4   # a tuning build in
                                          # build/kernels-s4/ (NANOPD_KERNELS_DIR selects it)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent
BUILD_DIR = CSRC.parent / "build" / "kernels"
NAME = "nanopd_kernels"
SOURCES = ["bindings.cpp", "paged_decode.cu", "kv_store.cu", "kv_copy.cu", "fused_bindings.cpp",
           "fused.cu", "gemv_bindings.cpp", "gemv.cu", "gemv_fused.cu"]
HEADERS = ["nanopd_kernels.h", "binding_checks.h", "device_utils.cuh",
           "paged_decode.cuh", "paged_decode_split.cuh", "fused_kernels.h", "gemv.h",
           "launch.h", "gemv.cuh", "gemv_epilogue.cuh", "gemv_stream.cuh", "fused_math.cuh",
           "fused_bindings.h"]  # for readers


def build(verbose: bool = False, ptxas_info: bool = False, variant: str | None = None,
          defines: list[str] | None = None) -> ModuleType:
    """Compile (if anything changed) and import the extension; a `variant` (with its `-D`
    defines) builds into build/kernels-VARIANT/ instead, for tuning runs."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import load

    build_dir = BUILD_DIR.with_name(f"kernels-{variant}") if variant else BUILD_DIR
    build_dir.mkdir(parents=True, exist_ok=True)
    cuda_flags = ["-O3", "-lineinfo"] + [f"-D{d}" for d in defines or []]
    if ptxas_info:
        cuda_flags.append("-Xptxas=-v")
    return load(
        name=NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=cuda_flags,
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        verbose=verbose or ptxas_info,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true", help="print the compiler commands")
    p.add_argument("--ptxas-info", action="store_true",
                   help="pass -Xptxas=-v: registers, shared memory and spills of each kernel "
                        "(touch a .cu file first to force its recompilation)")
    p.add_argument("--variant", help="build into build/kernels-VARIANT/ (tuning builds)")
    p.add_argument("-D", dest="defines", action="append", default=[],
                   help="a preprocessor define for the .cu files, e.g. NANOPD_DECODE_STAGES=4")
    args = p.parse_args()
    if args.defines and not args.variant:
        p.error("-D changes the kernels: give --variant NAME so the default build stays as is")
    start = time.perf_counter()
    module = build(args.verbose, args.ptxas_info, args.variant, args.defines)
    print(f"{NAME}: {module.__file__} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
