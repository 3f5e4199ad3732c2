#!/usr/bin/env bash
# GPT-2 small train-step throughput on one NVIDIA GPU (bf16, context 1024): the numbers in RESULTS.md.
# Usage: bash benchmarks/gpu_train_throughput.sh [output_dir]
set -u
out=${1:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
for spec in "16 cudnn none" "32 cudnn none" "16 xla none" "64 cudnn dots"; do
  set -- $spec
  echo "== batch $1 x 1024, attention=$2, remat=$3" | tee -a "$out/gpu.txt"
  timeout 240 python3 -m benchmarks.train_throughput --config=configs/gpt2_small.py --batch="$1" --seq=1024 \
    --steps=10 --config.model.dtype=bfloat16 --config.model.attention="$2" --config.model.remat="$3" 2>&1 \
    | grep -v -E "^(W|I)[0-9]{4}" | tail -12 | tee -a "$out/gpu.txt"
done
