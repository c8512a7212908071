#!/usr/bin/env bash
# One device call: GPU test tier, then (optionally) benchmarks. Logs under $OUT.
set -u
export PYTHONPATH=src:tests/gpu PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())"
timeout 400 python3 -m pytest -x -q tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -60
