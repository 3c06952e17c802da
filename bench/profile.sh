#!/usr/bin/env bash
# Kernel-level profile of one LoraKit training step on the GPU machine (after bench/pack.sh; carry .gpu):
#   bash bench/profile.sh [shape] [batch] [seq] [extra lorakit bench flags...]   e.g. bash bench/profile.sh llama-1b 8 1024
# Prepares the same random-init model and batch as run_bench.py, runs `lorakit bench --profile-range` under Nsight
# Compute (kernel durations only, normal clocks) and prints the kernels grouped by kind (bench/ncu_summary.py).
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-llama-1b}; b=${2:-8}; s=${3:-1024}; shift $(( $# < 3 ? $# : 3 ))
ids=$(python3 bench/prepare_batch.py "$shape" "$b" "$s")
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
out=${OUT:-/tmp}/ncu-$shape-${b}x$s.csv
"$ncu" --profile-from-start off --metrics gpu__time_duration.sum --clock-control none --csv --log-file "$out" \
  bash .gpu/on-gpu.sh LoraKit.Cli bench --model "/tmp/lorakit-bench/$shape" --ids "$ids" --steps 3 --warmup 2 --device cuda \
  --profile-range "$@"
python3 bench/ncu_summary.py "$out"
