#!/usr/bin/env bash
# GPT-2 small, batch 64 x 1024, bf16, cuDNN, unrolled: XLA GPU flag variants side by side.
set -u
out=${1:-.}
common="--config=configs/gpt2_small.py --seq=1024 --batch=64 --steps=5 --config.model.dtype=bfloat16 --config.model.attention=cudnn --config.model.scan_layers=False"
for flags in "" "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_enable_command_buffer=" "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer="; do
  echo "== XLA_FLAGS='$flags'" | tee -a "$out/flags.txt"
  XLA_FLAGS="$flags" timeout 100 python3 -m benchmarks.train_throughput $common 2>&1 \
    | grep -E "step time|tokens/s|MFU|peak memory" | tee -a "$out/flags.txt"
done
