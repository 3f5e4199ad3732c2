#!/usr/bin/env bash
# GPT-2 small on one NVIDIA GPU after the fused cross-entropy: breakdown and throughput (bf16, cuDNN, unrolled).
set -u
out=${1:-.}
common="--config=configs/gpt2_small.py --seq=1024 --steps=10 --config.model.dtype=bfloat16 --config.model.attention=cudnn --config.model.scan_layers=False"
echo "== breakdown batch 16" | tee -a "$out/fused.txt"
timeout 200 python3 -m benchmarks.step_breakdown $common --batch=16 2>&1 | grep -v -E "^(W|I)[0-9]{4}" | tail -8 | tee -a "$out/fused.txt"
for spec in "32 none" "64 none" "128 dots"; do
  set -- $spec
  echo "== throughput batch $1, remat=$2" | tee -a "$out/fused.txt"
  timeout 200 python3 -m benchmarks.train_throughput $common --batch=$1 --config.model.remat=$2 2>&1 \
    | grep -v -E "^(W|I)[0-9]{4}" | tail -10 | tee -a "$out/fused.txt"
done
