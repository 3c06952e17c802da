#!/usr/bin/env bash
# Evaluation throughput (issue 18): 1,000 cases on a random-init Llama-3.2-1B-shape model with 4 adapters, in one call,
# LoraKit's `lorakit eval` against the HF peer (bench/eval_peer.py) on the same model, adapters and suite.
# On the GPU machine (carry .gpu from bench/pack.sh):
#   bash bench/run_eval_bench.sh [OUT.json]            (default bench/results/eval.json)
# Settings by environment: SHAPE (llama-1b | tiny), CASES (1000), BATCH (32, both systems), DEVICE (cuda),
# HF_COMPILE=1 (also the peer with a static cache and compiled decoding), RAW=DIR (also copy both systems' per-case
# outputs there), LORAKIT (the command that starts the CLI; default the packed app), PEER (the peer script; default
# bench/eval_peer.py).
# Steps: make_eval_bench.py (model, adapters, suite under /tmp/lorakit-bench/eval-SHAPE), LoraKit on a one-case suite
# (its start, CUDA and model load, subtracted from the next), LoraKit on the suite, the HF peer, bench/eval_table.py.
# Each process is timed by the wall clock around it.
set -euo pipefail
out=${1:-bench/results/eval.json}
shape=${SHAPE:-llama-1b}
cases=${CASES:-1000}
batch=${BATCH:-32}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bf16}
read -r -a lorakit <<< "${LORAKIT:-bash .gpu/on-gpu.sh LoraKit.Cli}"
work=/tmp/lorakit-bench/eval-$shape
mkdir -p "$work"

now() { date +%s.%N; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$1" "$(now)"; }

t=$(now)
python3 bench/make_eval_bench.py --shape "$shape" --cases "$cases" | tee "$work/make.log"
echo "make: $(since "$t") s"
field() { python3 -c "import json, sys; v = json.load(open('$work/manifest.json'))[sys.argv[1]]; print(' '.join(v) if isinstance(v, list) else v)" "$1"; }
model=$(field model)
suite=$(field suite)
adapter_args=()
peer_args=()
for a in $(field adapters); do adapter_args+=(--adapter "$a"); peer_args+=(--adapter "$a"); done

"${lorakit[@]}" --version > /dev/null  # unpacks the app once, outside the timings
echo '{"id": "one", "kind": "capability", "text": "you are the one"}' > "$work/one.jsonl"
t=$(now)
"${lorakit[@]}" eval --model "$model" --suite "$work/one.jsonl" --json --device "$device" --dtype "$dtype" > /dev/null
startup=$(since "$t")
echo "lorakit one-case run: $startup s"

t=$(now)
"${lorakit[@]}" eval --model "$model" "${adapter_args[@]}" --suite "$suite" --json --device "$device" --dtype "$dtype" \
  --batch-size "$batch" > "$work/lorakit.json"
lk=$(since "$t")
echo "lorakit: $lk s"

t=$(now)
python3 "${PEER:-bench/eval_peer.py}" --model "$model" "${peer_args[@]}" --suite "$suite" --batch-size "$batch" --device "$device" \
  --cases-out "$work/hf-cases.json" | tee "$work/hf.log"
hf=$(since "$t")
tail -1 "$work/hf.log" > "$work/hf.json"
echo "hf: $hf s"
echo "{\"lorakit\": $lk, \"lorakit_startup\": $startup, \"hf\": $hf}" > "$work/walls.json"

python3 bench/eval_table.py "$work" "$out"
if [ -n "${RAW:-}" ]; then mkdir -p "$RAW" && cp "$work"/{manifest.json,lorakit.json,hf-cases.json,hf.log,walls.json} "$RAW/"; fi

if [ "${HF_COMPILE:-0}" = 1 ]; then
  python3 bench/eval_peer.py --model "$model" "${peer_args[@]}" --suite "$suite" --batch-size "$batch" --device "$device" --compile | tail -1 \
    | tee "$work/hf-compile.json"
fi
