#!/usr/bin/env bash
# Compile csrc's torch bindings (the .cpp files of csrc/build.py's SOURCES) with nvcc on a
# machine without a GPU or a CUDA torch, to catch their errors before a device call:
#   bash csrc/check_bindings.sh [csrc/FILE.cpp ...]        (make check-bindings)
# The .cu files need no torch (tests/unit/test_kernel_sources.py compiles them); the bindings
# include torch's CUDA headers, which a CPU torch ships all but one of. So: the CPU torch's
# headers, a shim for its missing cuda_cmake_macros.h, and the cuBLAS / cuSPARSE / cuSOLVER
# headers that ATen/cuda/CUDAContext.h includes, unpacked once from their PyPI wheels into
# build/cuda-headers/ (~900 MB downloaded, headers kept). Only compiles: nothing is linked.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
H=build/cuda-headers
if [ ! -f "$H/.done" ]; then
  rm -rf "$H" && mkdir -p "$H/whl" "$H/shim/c10/cuda/impl"
  "$PY" -m pip download -q --no-deps nvidia-cublas nvidia-cusparse nvidia-cusolver -d "$H/whl"
  for w in "$H"/whl/*.whl; do unzip -q -o "$w" '*/include/*' -d "$H"; done
  rm -rf "$H/whl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
    > "$H/shim/c10/cuda/impl/cuda_cmake_macros.h"
  touch "$H/.done"
fi
TI=$("$PY" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
PI=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
includes=(-I"$H/shim" -I"$TI" -I"$TI/torch/csrc/api/include" -I"$PI" -Icsrc)
for d in "$H"/nvidia/*/include; do includes+=(-I"$d"); done
if [ $# -gt 0 ]; then
  files=("$@")
else
  read -r -a files <<< "$("$PY" -c "from csrc.build import SOURCES
print(' '.join('csrc/' + s for s in SOURCES if s.endswith('.cpp')))")"
fi
# torch's own headers warn under C++17 (default bit-field initializers): not ours, silenced
quiet=(-Xcudafe --diag_suppress=3306 -Xcompiler -Wno-c++20-extensions)
failed=0
for f in "${files[@]}"; do
  start=$SECONDS
  if nvcc -std=c++17 -x cu -arch=sm_90 -c "$f" -o /dev/null "${includes[@]}" "${quiet[@]}" \
      -DTORCH_EXTENSION_NAME=nanopd_kernels; then
    echo "$f: compiles ($((SECONDS - start)) s)"
  else
    echo "$f: FAILED"; failed=1
  fi
done
exit $failed
