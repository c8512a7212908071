#!/usr/bin/env bash
# One device call for a tuning round: the normal-mode GPU tests, the profiles, the push sweep and
# the normal benchmark at 24 SMs once per kernel variant (EPCOMM_PUSH_ROWS / EPCOMM_PUSH_WARPS /
# EPCOMM_REDUCE_TOKENS). Logs and JSON under $OUT.  Usage: bash scripts/gpu_tune.sh
set -u
export PYTHONPATH=src:tests/gpu PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/epcomm-out}
mkdir -p "$OUT"
NUM_RANKS=${NUM_RANKS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_nvlink_normal.py 2>&1 | tee "$OUT/gpu_normal.log" | tail -15
OUT=$OUT timeout 120 python3 scripts/profile_normal.py 2>&1 | tee "$OUT/profile_normal.log" \
  | grep -E "back-to-back|_kernel|Memcpy|Self CUDA" | head -40
[ -f scripts/sweep_push.py ] && timeout 120 python3 scripts/sweep_push.py 2>&1 | tee "$OUT/sweep_push.log" | tail -40
[ -f scripts/profile_low_latency.py ] && timeout 120 python3 scripts/profile_low_latency.py 2>&1 | tee "$OUT/profile_ll.log" | tail -60
for v in "2 16 2" "4 16 4" "2 32 1" "4 32 2"; do
  set -- $v
  echo "== variant PUSH_ROWS=$1 PUSH_WARPS=$2 REDUCE_TOKENS=$3"
  EPCOMM_PUSH_ROWS=$1 EPCOMM_PUSH_WARPS=$2 EPCOMM_REDUCE_TOKENS=$3 timeout 120 python3 benchmarks/bench_normal.py \
    --num-ranks "$NUM_RANKS" --settings prefill --ops dispatch_bf16,dispatch_fp8,combine_bf16 --sms 24 --baselines user \
    --no-tqdm --out "$OUT/variants.jsonl" 2>&1 | grep -E "nvlink|user|speed" | tail -8
done
