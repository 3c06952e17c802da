#!/usr/bin/env bash
# Host-overhead experiment on the GPU machine (after bench/pack.sh; carry .gpu): times `lorakit bench` on the same
# model and batch as run_bench.py under different .NET runtime settings (GC mode, gen0 budget), since the GPU idles
# when the host falls behind. Usage: bash bench/env_sweep.sh [shape] [batch] [seq]
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-llama-1b}; b=${2:-8}; s=${3:-1024}
ids=$(python3 bench/prepare_batch.py "$shape" "$b" "$s")
for env in "" "DOTNET_gcServer=1" "DOTNET_GCgen0size=0x20000000" "DOTNET_gcServer=1 DOTNET_GCgen0size=0x20000000"; do
  out=$(env $env bash .gpu/on-gpu.sh LoraKit.Cli bench --model /tmp/lorakit-bench/$shape --ids "$ids" --steps 20 --warmup 3 --device cuda 2>/dev/null | tail -1)
  echo "$shape ${env:-default}: $(echo "$out" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(r["step_s"]*1000, "ms/step", r["tokens_per_s"], "tok/s")')"
done
