#!/usr/bin/env bash
# Multi-LoRA serving throughput on the GPU machine (carry .gpu from bench/pack.sh):
#   bash bench/run_serve_bench.sh [OUT.json]
# A random-init Llama-3.2-1B-shape model (bench/run_bench.py's), the fixture tokenizer, 64 concurrent requests of 128
# prompt + 64 generated tokens, spread over 1, 8 and 32 adapters, against the same load on the plain model — which is
# what a merged model costs.
set -euo pipefail
out=${1:-bench/results/serve.json}
python3 -c "import sys; sys.path.insert(0, 'bench'); import run_bench; run_bench.prepare('llama-1b')"
model=/tmp/lorakit-bench/llama-1b
cp fixtures/models/llama/tokenizer.json fixtures/models/llama/tokenizer_config.json "$model/"
rows=()
for k in 0 1 8 32; do
  line=$(bash .gpu/on-gpu.sh LoraKit.Cli bench-serve --model "$model" --adapters "$k" --requests 64 --max-tokens 64 --prompt-tokens 128 --max-batch 32 --device cuda | tail -1)
  echo "$line"
  rows+=("$line")
done
printf '%s\n' "${rows[@]}" | python3 bench/serve_table.py "$out"
