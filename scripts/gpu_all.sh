#!/usr/bin/env bash
# One device call: the GPU test tier, then both benchmarks. Logs and JSON under $OUT.
# Usage on the GPU machine, from the repo root:  bash scripts/gpu_all.sh [tests|bench|rows|copy|combine|all]
# (on 4 GPUs "all" takes longer than one 10-minute device call: run "tests", then "bench", then "rows")
set -u
what=${1:-all}
export PYTHONPATH=src:tests/gpu PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/epcomm-out}
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
# Every GPU of the machine (4 on nvidia-h200-x4; 2 or 1 on the smaller kinds).
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$what" = tests ] || [ "$what" = all ]; then
  # Multi-rank cases run one GPU per rank where the machine has enough GPUs, else all ranks on one
  # GPU (tests/gpu/placement.py): on one H200 that is EP2 / EP4 / EP8, on four EP2 / EP4 + EP8 shared.
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 240 python3 benchmarks/bench_low_latency.py --out "$OUT/low_latency.jsonl" 2>&1 | tee "$OUT/bench_low_latency.log" | tail -20
  timeout 300 python3 benchmarks/bench_normal.py --num-ranks "$n" --out "$OUT/normal.jsonl" --plot "$OUT/normal.png" 2>&1 \
    | tee "$OUT/bench_normal.log" | grep -v "it/s" | tail -60
  # get_dispatch_layout as torch ops (EPCOMM_LAYOUT_KERNEL=torch) beside the default Triton kernel.
  EPCOMM_LAYOUT_KERNEL=torch timeout 120 python3 benchmarks/bench_normal.py --num-ranks "$n" --settings prefill \
    --ops layout --baselines reference --no-tqdm --out "$OUT/normal.jsonl" 2>&1 | tee -a "$OUT/bench_normal.log" | grep -E "^layout|layout:"
  # Where a cold call's host time goes at EP4 (rank 0): launch vs device timeline, wrapped functions.
  timeout 180 python3 scripts/host_path.py --num-ranks "$n" 2>&1 | tee "$OUT/host_path.log" | grep -E "^== |call wall"
fi
if [ "$what" = copy ]; then
  # Dispatch copy-out: after the push on the caller's stream (0) against the copy engine behind the
  # push's progress flags with 1 / 2 / 4 / 8 ranges, interleaved (EPCOMM_COPY_CHECKPOINTS).
  for round in 1 2; do
    for ck in ${COPY_CHECKPOINTS:-0 4 1 2 8}; do
      echo "### EPCOMM_COPY_CHECKPOINTS=$ck, round $round"
      EPCOMM_COPY_CHECKPOINTS=$ck timeout 100 python3 benchmarks/bench_normal.py --num-ranks "$n" --settings prefill \
        --sms 24 --ops dispatch_bf16,dispatch_fp8 --baselines user --no-tqdm --out "$OUT/copy_ab.jsonl" 2>&1 \
        | grep -E "^(dispatch|combine).*nvlink|FAIL|Error|Traceback"
    done
  done | tee "$OUT/copy_ab.log"
fi
if [ "$what" = combine ]; then
  # Combine: push in contiguous parts then reduce (default) against the push balanced over the
  # destinations, and the reduce beside the push (progress ranges x reduce SMs), at 24 and 8 SMs,
  # interleaved; COMBINE_VARIANTS picks (space-separated, each a comma-separated env list).
  variants=${COMBINE_VARIANTS:-"EPCOMM_COMBINE_PUSH=contiguous EPCOMM_COMBINE_PUSH=balanced EPCOMM_COMBINE_OVERLAP=4 EPCOMM_COMBINE_OVERLAP=8 EPCOMM_COMBINE_OVERLAP=4,EPCOMM_COMBINE_REDUCE_SMS=12"}
  for round in $(seq 1 "${ROUNDS:-1}"); do
    for variant in $variants; do
      echo "### $variant, round $round"
      env ${variant//,/ } timeout 100 python3 benchmarks/bench_normal.py --num-ranks "$n" --settings prefill \
        --sms 24,8 --ops combine_bf16 --baselines user --no-tqdm --out "$OUT/combine_ab.jsonl" 2>&1 \
        | grep -E "^combine.*nvlink|FAIL|Error|Traceback"
    done
  done | tee "$OUT/combine_ab.log"
fi
if [ "$what" = rows ]; then
  # Rows per push step: the old fixed 2 against the byte-sized rule (push_rows_per_step), interleaved.
  for round in 1 2; do
    for rows in 2 0; do
      echo "### EPCOMM_PUSH_ROWS=$rows (0 = rule), round $round"
      EPCOMM_PUSH_ROWS=$rows timeout 120 python3 benchmarks/bench_normal.py --num-ranks "$n" --settings prefill \
        --sms 24 --ops dispatch_bf16,dispatch_fp8,combine_bf16 --baselines user --no-tqdm --out "$OUT/rows_ab.jsonl" 2>&1 \
        | grep -E "^(dispatch|combine)" | grep nvlink
    done
  done | tee "$OUT/rows_ab.log"
fi
