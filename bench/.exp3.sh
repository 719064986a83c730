set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 csrc/build.py > /tmp/build.log 2>&1 || { tail /tmp/build.log; exit 1; }
for flags in "" "--contiguous-blocks" "--num-heads 6 --num-kv-heads 1" "--num-heads 6 --num-kv-heads 1 --contiguous-blocks"; do
  echo "=== $flags"
  python3 bench/kernels.py --no-build --ours-only --batches 32,64,128 --contexts 2048,8192 $flags 2>&1 | grep -v "^copy\|batch"
done
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section Occupancy --section WarpStateStats"
echo "=== ncu paged scattered"; ncu --clock-control none --kernel-name regex:paged_decode --launch-skip 3 --launch-count 1 $S python3 bench/kernels.py --no-build --ours-only --batches 64 --contexts 8192 --warmup 2 --reps 2 2>&1 | grep -E "Throughput|Hit Rate|Duration|Busy|Eligible|Issued|lts|Sectors|Requests|L2|DRAM|stall|Stall" | head -60
echo "=== ncu sdpa"; ncu --clock-control none --kernel-name regex:flash --launch-skip 3 --launch-count 1 $S python3 bench/kernels.py --no-build --batches 64 --contexts 8192 --warmup 2 --reps 2 2>&1 | grep -E "flash|Throughput|Hit Rate|Duration|Busy|Eligible|Issued|L2|DRAM|Grid|Block Size|Registers|Shared" | head -40
