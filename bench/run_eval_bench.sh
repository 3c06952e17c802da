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
cd "$(dirname "$0")/.."
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
# A bound per system (LK_TIMEOUT, HF_TIMEOUT seconds) keeps the call inside the device's 10-minute limit; on a
# timeout the script stops with what it measured. SKIP=lorakit or SKIP=hf reuses that system's results from an earlier
# call on the same (still warm) machine, to split the work over two calls if one is too long.
if [[ " ${SKIP:-} " != *" lorakit "* ]]; then
  t=$(now)
  "${lorakit[@]}" eval --model "$model" --suite "$work/one.jsonl" --json --device "$device" --dtype "$dtype" > /dev/null
  since "$t" > "$work/wall-lorakit_startup"
  echo "lorakit one-case run: $(cat "$work/wall-lorakit_startup") s"
  t=$(now)
  timeout "${LK_TIMEOUT:-280}" "${lorakit[@]}" eval --model "$model" "${adapter_args[@]}" --suite "$suite" --json --device "$device" \
    --dtype "$dtype" --batch-size "$batch" > "$work/lorakit.json" || { echo "lorakit eval failed or ran past ${LK_TIMEOUT:-280} s (rc $?) after $(since "$t") s"; exit 1; }
  since "$t" > "$work/wall-lorakit"
  echo "lorakit: $(cat "$work/wall-lorakit") s"
fi

if [[ " ${SKIP:-} " != *" hf "* ]]; then
  t=$(now)
  timeout "${HF_TIMEOUT:-200}" python3 "${PEER:-bench/eval_peer.py}" --model "$model" "${peer_args[@]}" --suite "$suite" --batch-size "$batch" \
    --device "$device" --cases-out "$work/hf-cases.json" | tee "$work/hf.log"
  since "$t" > "$work/wall-hf"
  tail -1 "$work/hf.log" > "$work/hf.json"
  echo "hf: $(cat "$work/wall-hf") s"
fi
echo "{\"lorakit\": $(cat "$work/wall-lorakit"), \"lorakit_startup\": $(cat "$work/wall-lorakit_startup"), \"hf\": $(cat "$work/wall-hf")}" > "$work/walls.json"

rm -f "$work/hf-compile.json"
if [ "${HF_COMPILE:-0}" = 1 ]; then
  timeout "${HF_TIMEOUT:-200}" python3 bench/eval_peer.py --model "$model" "${peer_args[@]}" --suite "$suite" --batch-size "$batch" \
    --device "$device" --compile | tail -1 > "$work/hf-compile.json" || { echo "the compiled peer failed or ran out of time"; rm -f "$work/hf-compile.json"; }
fi

python3 bench/eval_table.py "$work" "$out"
if [ -n "${RAW:-}" ]; then mkdir -p "$RAW" && cp "$work"/{manifest.json,lorakit.json,hf-cases.json,hf.log,walls.json} "$RAW/"; fi
