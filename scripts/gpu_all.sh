#!/usr/bin/env bash
# The GPU test tier and the two benchmarks on a GPU machine, with logs and JSON rows under $OUT.
# Usage, from the repo root:  bash scripts/gpu_all.sh [tests|bench|all|soak|multinode] [TEST_FILE...]   (default: all)
# tests: every file of tests/gpu (or the TEST_FILEs given), each under its own limit (TEST_TIMEOUT_S,
# default 400) and interrupted, not killed, at the limit, so its log still lists what failed.
# soak: random iterations of both modes against the reference at 2 and then 4 ranks sharing GPU 0:
# ITERATIONS (default 10,000) from FIRST_ITERATION (default 0), each size stopping cleanly, with its
# report, after SOAK_SECONDS (default 270). Ranks sharing a GPU time-slice it, so 10,000 iterations
# may take several runs, each going on where the last stopped.
# multinode: the multi-node modes on NVSHMEM, one process per GPU where there are enough (simulated
# nodes 2x1, 2x2, 4x1): tests/gpu/test_nvshmem.py, then benchmarks/bench_multinode.py at the prefill
# shape (4096 tokens a rank, hidden 7168, top-8 of 256 experts, 24 SMs, FP8 and BF16 dispatch) and
# the decode shape (128 tokens, FP8 dispatch, graph replay), then the same shapes in one NVLink
# domain (bench_normal.py, bench_low_latency.py). Needs 4 GPUs for every layout.
set -u
what=${1:-all}
shift || true
case "$what" in
  tests | bench | all | soak | multinode) ;;
  *)
    echo "usage: bash scripts/gpu_all.sh [tests|bench|all|soak|multinode] [TEST_FILE...]" >&2
    exit 2
    ;;
esac
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/epcomm-out}
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
# The benchmarks run one rank per GPU of the machine.
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$what" = tests ] || [ "$what" = all ]; then
  # Multi-rank cases run one GPU per rank where the machine has enough GPUs, else all ranks on one
  # GPU (tests/gpu/placement.py): on one H200 that is EP2 / EP4 / EP8, on four EP2 / EP4 + EP8 shared.
  files=("$@")
  [ ${#files[@]} -eq 0 ] && files=(tests/gpu/test_*.py)
  for file in "${files[@]}"; do
    name=$(basename "$file" .py)
    timeout -s INT "${TEST_TIMEOUT_S:-400}" python3 -m pytest -q -rfEs --tb=short "$file" 2>&1 \
      | tee "$OUT/gpu_$name.log" | tail -25
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 240 python3 benchmarks/bench_low_latency.py --out "$OUT/low_latency.jsonl" 2>&1 | tee "$OUT/bench_low_latency.log" | tail -20
  timeout 300 python3 benchmarks/bench_normal.py --num-ranks "$n" --out "$OUT/normal.jsonl" --plot "$OUT/normal.png" 2>&1 \
    | tee "$OUT/bench_normal.log" | grep -v "it/s" | tail -60
  # get_dispatch_layout as torch ops (EPCOMM_LAYOUT_KERNEL=torch) beside the default Triton kernel.
  EPCOMM_LAYOUT_KERNEL=torch timeout 120 python3 benchmarks/bench_normal.py --num-ranks "$n" --settings prefill \
    --ops layout --baselines reference --no-tqdm --out "$OUT/normal.jsonl" 2>&1 | tee -a "$OUT/bench_normal.log" | grep -E "^layout|layout:"
  # Where a cold call's host time goes (rank 0): launch vs device timeline, wrapped functions.
  timeout 180 python3 scripts/host_path.py --num-ranks "$n" 2>&1 | tee "$OUT/host_path.log" | grep -E "^== |call wall"
fi
if [ "$what" = soak ]; then
  seconds=${SOAK_SECONDS:-270}
  for ranks in 2 4; do
    PYTHONPATH=src python3 -m epcomm soak --iterations "${ITERATIONS:-10000}" \
      --first-iteration "${FIRST_ITERATION:-0}" --max-seconds "$seconds" --timeout "$((seconds + 120))" \
      --num-processes "$ranks" --transport nvlink --dist-backend gloo-shared-gpu 2>&1 \
      | tee "$OUT/soak_${ranks}ranks_shared.log" | tail -8
  done
fi
if [ "$what" = multinode ]; then
  EPCOMM_TIMEOUT_S=30 timeout -s INT "${TEST_TIMEOUT_S:-400}" python3 -m pytest -q -rfEs --tb=short \
    tests/gpu/test_nvshmem.py 2>&1 | tee "$OUT/gpu_test_nvshmem.log" | tail -25
  layouts=2x1,2x2,4x1
  for dtype in fp8 bf16; do
    timeout 300 python3 benchmarks/bench_multinode.py --backend nvshmem --layouts "$layouts" --tokens 4096 \
      --hidden 7168 --experts 256 --dtype "$dtype" --num-sms 24 --out "$OUT/bench_multinode.jsonl" 2>&1 \
      | tee -a "$OUT/bench_multinode.log" | tail -40
  done
  timeout 240 python3 benchmarks/bench_multinode.py --mode low-latency --backend nvshmem --layouts "$layouts" \
    --tokens 128 --hidden 7168 --experts 256 --out "$OUT/bench_multinode.jsonl" 2>&1 \
    | tee -a "$OUT/bench_multinode.log" | tail -40
  # The same shapes within one NVLink domain, in the same run.
  timeout 240 python3 benchmarks/bench_low_latency.py --tokens 128 --out "$OUT/low_latency.jsonl" 2>&1 \
    | tee "$OUT/bench_low_latency.log" | tail -20
  timeout 300 python3 benchmarks/bench_normal.py --num-ranks "$n" --settings prefill --sms 24 --out "$OUT/normal.jsonl" \
    --no-tqdm 2>&1 | tee "$OUT/bench_normal.log" | tail -40
fi
