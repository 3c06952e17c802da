#!/usr/bin/env bash
# Kernel-level profile of one LoraKit training step on the GPU machine (after bench/pack.sh; carry .gpu):
#   bash bench/profile.sh [shape] [batch] [seq] [extra lorakit bench flags...]   e.g. bash bench/profile.sh llama-1b 8 1024
# Prepares the same random-init model and batch as run_bench.py, runs `lorakit bench --profile-range` under Nsight
# Compute (kernel durations only, normal clocks) and prints the kernels grouped by kind (bench/ncu_summary.py).
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-llama-1b}; b=${2:-8}; s=${3:-1024}; shift $(( $# < 3 ? $# : 3 ))
ids=$(python3 - "$shape" "$b" "$s" <<'PY'
import os, sys, torch
sys.path.insert(0, "bench")
import run_bench as rb
from safetensors.torch import save_file
shape, b, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = rb.prepare(shape)
torch.manual_seed(1)
ids = torch.randint(0, rb.SHAPES[shape][2]["vocab_size"], (b, s))
p = os.path.join(rb.WORK, f"ids-{shape}-{b}x{s}.safetensors")
save_file({"input_ids": ids}, p)
print(p)
PY
)
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
out=${OUT:-/tmp}/ncu-$shape-${b}x$s.csv
"$ncu" --profile-from-start off --metrics gpu__time_duration.sum --clock-control none --csv --log-file "$out" \
  bash .gpu/on-gpu.sh LoraKit.Cli bench --model "/tmp/lorakit-bench/$shape" --ids "$ids" --steps 3 --warmup 2 --device cuda \
  --profile-range "$@"
python3 bench/ncu_summary.py "$out"
