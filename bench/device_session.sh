#!/usr/bin/env bash
# One device call that builds, checks and times a set of things; everything lands in $OUT.
#   bash bench/device_session.sh PHASE...      (on the GPU machine, from the repo root)
# Phases (run in the order given):
#   build      make kernels (+ the tuning variants of VARIANTS, built in the background, and
#              build/base/csrc as the build "base" if it is there: bench/base.sh REV makes it,
#              an older revision's kernels to time against, carried as build/base)
#   tests      the GPU test suite (TESTS: only these files or node ids)
#   sanitize   compute-sanitizer memcheck and racecheck over every kernel (a small case)
#   checks     tests and sanitize at the same time (neither is timed)
#   profile    ncu on paged_decode, batch 64 at 8k context (PROFILE_CONTEXTS)
#   attnprof   ncu on ours and on FlashInfer's tensor-core decode (carry .fi), batch 128 at 8k
#              (ATTNPROF_BATCH, ATTNPROF_CONTEXT): throughput, stall reasons per issue, and the
#              L2 sectors and requests from the SMs against the DRAM sectors read; ours once per
#              build of ATTNPROF_BUILDS (names: default, base, a variant; default "default")
#   kernels    bench/kernels.py (with chunk-count and warp sweeps; again with the L2 flushed by
#              a read, --flush read), then each built variant
#   decode     bench/decode_step.py (Qwen2.5-1.5B shape: graphs, eager, HF, the floor)
#   stepprof   bench/decode_profile.py: one decode step's kernels by name and kind, GEMVs alone
#   steptrace  ncu's PM sampling over one decode step's CUDA graph (bench/step_trace.py, batch
#              STEPTRACE_BATCH x STEPTRACE_CONTEXT, default 1 x 512): the report, and the kernel
#              spans of one replay; bench/pm_samples.py makes the timeline from the report
#   gemvprof   ncu over bench/gemv_ncu.py: each GEMV of a one-sequence layer alone, with and
#              without the add + norm split (duration, stall reasons)
#   abbase     decode steps of build/base-full (bench/base.sh --full REV: another revision
#              whole, its own kernels, built in the build phase) and of the working tree, one
#              process each, alternating, AB_PASSES times (default 2); AB_BATCHES (default
#              1,2,8), contexts 512,4096; files ab_base_N.json and ab_tree_N.json (AB_TAG:
#              a suffix, ab_tree_N_TAG.json, for runs under other settings)
#   ab         decode steps at batch 1-2 with each opt-in path off and on, one process each
#              (AB="NANOPD_GEMV_FUSE NANOPD_PDL": the variables to flip, default the fused
#              GEMV; AB_VALUES="0 1 norm": their values, default "0 1"; AB_TAG: a suffix
#              for the file names of runs under other settings; AB_BATCHES: default 1,2)
#   prefill    bench/prefill_attention.py (which prefill / extend attention route is fastest)
#   flashinfer bench/flashinfer_decode.py: FlashInfer's paged decode on the same shapes (carry .fi,
#              which bench/make_fi.py makes; FI_ARGS=--tensor-cores adds its tensor-core decode)
#   kv         bench/kv_transfer.py (two GPUs: cuda:0 -> cuda:1; one: both processes on cuda:0)
#   mesh       bench/mesh_gpu.py: the whole mesh as processes on the GPU(s) (carry .whl, .tok:
#              bench/carry.sh makes them)
#   offline    bench/offline_throughput.py with the HF baseline
#   quick      bench/offline_throughput.py without it
# The device returns at most 8 files: logs and JSON are collected in $OUT/session.tar.gz
# (rewritten after every step) and the step summaries in $OUT/summary.txt.
# Steps are independent: one failing does not stop the next; each has a time limit.
set -u
OUT=${OUT:-out}
WORK=/tmp/nanopd-session
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
# unset: the decode-attention tuning builds below; set, even to '': only those named
VARIANTS=${VARIANTS-"l2none:NANOPD_L2_PREFETCH=0 l2x256:NANOPD_L2_PREFETCH=256 s4:NANOPD_DECODE_STAGES=4"}

kdir() {  # kdir NAME: the kernels folder of build NAME (default, base or a variant)
  case $1 in default) echo build/kernels ;; base) echo build/base/build/kernels-base ;;
    *) echo "build/kernels-$1" ;; esac
}

collect() { tar -czf "$OUT/session.tar.gz" -C "$WORK" . 2>/dev/null; }

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$WORK/$name.log"
  collect
}

{ nvidia-smi -L; date -u; python3 -c "import torch; print('torch', torch.__version__)"; } \
  | tee "$WORK/env.txt"

for phase in "$@"; do
  case $phase in
    build)
      step build 300 python3 csrc/build.py
      for v in $VARIANTS; do
        name=${v%%:*}; defs=${v#*:}
        args=()
        for d in ${defs//,/ }; do args+=(-D "$d"); done
        (timeout 300 python3 csrc/build.py --variant "$name" "${args[@]}" \
          > "$WORK/build_$name.log" 2>&1) &
      done
      if [ -f build/base-full/csrc/build.py ]; then
        (cd build/base-full && timeout 300 python3 csrc/build.py \
          > "$WORK/build_base-full.log" 2>&1) &
      fi
      if [ -f build/base/csrc/build.py ]; then
        (timeout 300 python3 build/base/csrc/build.py --variant base \
          > "$WORK/build_base.log" 2>&1) &
      fi ;;
    tests)
      step gpu_tests 330 python3 -m pytest -q -rs ${TESTS:-tests/gpu} ;;
    checks)
      step gpu_tests 330 python3 -m pytest -q -rs tests/gpu &
      step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 tests/gpu/sanitize_case.py
      step racecheck 200 compute-sanitizer --tool racecheck --error-exitcode 3 \
        python3 tests/gpu/sanitize_case.py
      wait ;;
    sanitize)
      step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 tests/gpu/sanitize_case.py
      step racecheck 200 compute-sanitizer --tool racecheck --error-exitcode 3 \
        python3 tests/gpu/sanitize_case.py ;;
    profile)
      for ctx in ${PROFILE_CONTEXTS:-8192}; do
        step "ncu_64x$ctx" 120 ncu --clock-control none --kernel-name regex:paged_decode \
          --launch-skip 3 --launch-count 1 --section SpeedOfLight \
          --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
          --section SchedulerStats --section LaunchStats \
          python3 bench/kernels.py --no-build --ours-only --batches 64 --contexts "$ctx" \
          --warmup 2 --reps 2
      done ;;
    attnprof)
      b=${ATTNPROF_BATCH:-128} c=${ATTNPROF_CONTEXT:-8192}
      lts=lts__t_sectors_srcunit_tex_op_read.sum,lts__t_requests_srcunit_tex_op_read.sum
      lts=$lts,dram__sectors_read.sum,smsp__inst_executed_op_ldgsts.sum
      ncu_args=(ncu --clock-control none --target-processes all --launch-skip 3
        --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis
        --section Occupancy --section SchedulerStats --section WarpStateStats
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,$lts")
      wait  # the variant builds
      for name in ${ATTNPROF_BUILDS:-default}; do
        step "ncu_ours_${name}_${b}x$c" 120 env NANOPD_KERNELS_DIR="$(kdir "$name")" \
          "${ncu_args[@]}" --kernel-name regex:paged_decode \
          python3 bench/kernels.py --no-build --ours-only --batches "$b" --contexts "$c" \
          --warmup 2 --reps 2
      done
      step "ncu_fi_tc_${b}x$c" 240 "${ncu_args[@]}" --kernel-name regex:Prefill \
        python3 bench/flashinfer_decode.py --tensor-cores --batches "$b" --contexts "$c" \
        --head-dims 128 --warmup 2 --reps 2 --out "$WORK/fi_attnprof.json" ;;
    kernels)
      step kernels 240 python3 bench/kernels.py --no-build --splits-sweep 1,2,4,8,16,32,64 \
        --warps-sweep --min-chunk 64 --out "$WORK/kernels.json"
      step kernels_flush-read 120 python3 bench/kernels.py --no-build --flush read \
        --out "$WORK/kernels_flush-read.json"
      wait  # the variant builds (started by the build phase)
      names=""
      for v in $VARIANTS; do names="$names ${v%%:*}"; done
      [ -f build/base/csrc/build.py ] && names="$names base"
      for name in $names; do
        [ -f "$(kdir "$name")/nanopd_kernels.so" ] || { echo "no build of $name"; continue; }
        step "kernels_$name" 90 env NANOPD_KERNELS_DIR="$(kdir "$name")" \
          python3 bench/kernels.py --no-build --ours-only --batches 1,32,64,128 \
          --contexts 2048,8192 --splits-sweep 1,2,4,8 --out "$WORK/kernels_$name.json"
      done ;;
    decode)
      step decode_step 330 python3 bench/decode_step.py --out "$WORK/decode_step.json" ;;
    stepprof)
      step decode_profile 240 python3 bench/decode_profile.py --out "$WORK/decode_profile.json" ;;
    steptrace)
      b=${STEPTRACE_BATCH:-1} c=${STEPTRACE_CONTEXT:-512}
      step "spans_${b}x$c" 120 python3 bench/step_trace.py --batch "$b" --context "$c" \
        --spans "$WORK/spans_${b}x$c.json"
      step "pm_${b}x$c" 240 ncu --clock-control none --profile-from-start off \
        --graph-profiling graph --section PmSampling --pm-sampling-interval 1000 -f \
        -o "$WORK/step_${b}x$c" python3 bench/step_trace.py --batch "$b" --context "$c" ;;
    gemvprof)
      step ncu_gemv 200 ncu --clock-control none --kernel-name regex:"gemv|rms_norm" \
        --launch-skip 10 --section SpeedOfLight --section WarpStateStats --section LaunchStats \
        --section Occupancy --section SchedulerStats python3 bench/gemv_ncu.py ;;
    ab)
      wait  # the variant builds (a value may be one: NANOPD_KERNELS_DIR=build/kernels-NAME)
      for var in ${AB:-NANOPD_GEMV_FUSE}; do
        for val in ${AB_VALUES:-0 1}; do
          tag=${val//\//-}${AB_TAG:+_$AB_TAG}  # a value may be a path; AB_TAG: a run's name
          step "ab_${var}_$tag" 150 env "$var=$val" python3 bench/decode_step.py --skip-hf \
            --batches "${AB_BATCHES:-1,2}" --contexts 512,4096 --out "$WORK/ab_${var}_$tag.json"
        done
      done ;;
    abbase)
      wait  # the builds
      if [ ! -f build/base-full/build/kernels/nanopd_kernels.so ]; then
        echo "no build of build/base-full (bench/base.sh --full REV, carried)"; continue
      fi
      for i in $(seq "${AB_PASSES:-2}"); do
        i=$i${AB_TAG:+_$AB_TAG}
        step "ab_base_$i" 150 bash -c 'cd build/base-full && PYTHONPATH=$PWD exec python3 \
          bench/decode_step.py --skip-hf --batches "$1" --contexts 512,4096 --out "$2"' _ \
          "${AB_BATCHES:-1,2,8}" "$WORK/ab_base_$i.json"
        step "ab_tree_$i" 150 python3 bench/decode_step.py --skip-hf \
          --batches "${AB_BATCHES:-1,2,8}" --contexts 512,4096 --out "$WORK/ab_tree_$i.json"
      done ;;
    prefill)
      step prefill_attention 120 python3 bench/prefill_attention.py \
        --out "$WORK/prefill_attention.json" ;;
    flashinfer)
      step flashinfer 300 python3 bench/flashinfer_decode.py ${FI_ARGS:-} \
        --out "$WORK/flashinfer.json" ;;
    kv)
      step kv_transfer 240 python3 bench/kv_transfer.py --out "$WORK/kv_transfer.json" ;;
    mesh)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$WORK/pip.log" 2>&1
      step mesh_gpu 420 env PYTHONPATH="$PYTHONPATH:/tmp/site" python3 bench/mesh_gpu.py \
        --tokenizer .tok --out "$WORK/mesh_gpu.json" ;;
    offline)
      step offline 420 python3 bench/offline_throughput.py --hf-num-seqs 64 \
        --hf-batch-size 32 --out "$WORK/offline_throughput_qwen3-0.6b.json" ;;
    quick)
      step offline 300 python3 bench/offline_throughput.py --skip-hf \
        --out "$WORK/offline_throughput_qwen3-0.6b.json" ;;
    *) echo "unknown phase $phase" ;;
  esac
done
wait
collect
