#!/usr/bin/env bash
# Where GPT-2 small's train step spends its time on one NVIDIA GPU (bf16, cuDNN attention), scan vs unrolled.
set -u
out=${1:-.}
for scan in True False; do
  echo "== breakdown batch 16 x 1024, scan_layers=$scan" | tee -a "$out/breakdown.txt"
  timeout 200 python3 -m benchmarks.step_breakdown --config=configs/gpt2_small.py --batch=16 --seq=1024 --steps=10 \
    --config.model.dtype=bfloat16 --config.model.attention=cudnn --config.model.scan_layers=$scan 2>&1 \
    | grep -v -E "^(W|I)[0-9]{4}" | tail -8 | tee -a "$out/breakdown.txt"
done
echo "== throughput batch 32 x 1024, scan_layers=False" | tee -a "$out/breakdown.txt"
timeout 200 python3 -m benchmarks.train_throughput --config=configs/gpt2_small.py --batch=32 --seq=1024 --steps=10 \
  --config.model.dtype=bfloat16 --config.model.attention=cudnn --config.model.scan_layers=False 2>&1 \
  | grep -v -E "^(W|I)[0-9]{4}" | tail -10 | tee -a "$out/breakdown.txt"
