#!/usr/bin/env bash
# One device call that builds, checks and times everything, writing logs and JSON to $OUT.
#   bash bench/device_session.sh [quick]      (on the GPU machine, from the repo root)
# Steps are independent: one failing does not stop the next; each has a time limit.
# 'quick' skips the HF baseline of the offline benchmark (about 2 minutes of the total).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - t0)) s (log $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log"
}

{ nvidia-smi -L; date -u; python3 -c "import torch; print('torch', torch.__version__)"; } \
  | tee "$OUT/env.txt"
step build 240 make kernels
step gpu_tests 420 python3 -m pytest -q -rs tests/gpu
step kernels 180 python3 bench/kernels.py --no-build --out "$OUT/kernels.json"
hf=(--hf-num-seqs 64 --hf-batch-size 32)
[ "${1:-}" = quick ] && hf=(--skip-hf)
step offline 420 python3 bench/offline_throughput.py "${hf[@]}" \
  --out "$OUT/offline_throughput_qwen3-0.6b.json"
if [ "$NGPU" -ge 1 ]; then  # two GPUs: cuda:0 -> cuda:1; one: both processes on cuda:0
  step kv_transfer 240 python3 bench/kv_transfer.py --out "$OUT/kv_transfer.json"
fi
