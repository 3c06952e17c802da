#!/usr/bin/env bash
# The serving benchmark of issue 21 in ONE device call (limit 10 min), from the repo root after bench/pack.sh (carry .gpu):
#   bash bench/run_serve_bench.sh [--quick] [--no-hf | --only-lorakit] [--no-lorakit | --only-hf] [--dry-run]
#                                 [--loads A,B128,B512] [--adapters-a 0,32,1,8,1000] [--adapters-b 0,32]
#                                 [--budget S] [--run-timeout S] [--hf-only eager,compiled,peft]
#                                 [--lorakit-args "..."] [--hf-args "..."] [--results DIR]
# In order (the load-A phases first: every target of the issue is judged on load A, so a cut drops B rows first):
#   1. the random-init Llama-3.2-1B-shape model of bench/run_bench.py (`prepare('llama-1b')`) + the fixture tokenizer;
#   2. a copy-rate probe: a 1 GiB device-to-device copy, GB/s of bytes read + written (the weight-read floor's rate);
#   3. LoraKit `bench-serve` on load A (64 requests, 128 prompt + 64 new tokens) with 0, 32, 1, 8, 1000 adapters;
#   4. the HF peer on load A (bench/hf_serve_peer.py: eager batch 32/64, static cache + compile, PEFT 1/8/32 adapters);
#   5. LoraKit on loads B128 / B512 (256 requests, 128 / 512 prompt + 128 new tokens) with 0 and 32 adapters;
#   6. the HF peer on B128 / B512 (eager, static cache + compile);
#   7. the table: bench/serve_table.py -> RESULTS/serve.json, RESULTS/serve-table.md, and stdout.
# Every row (and the probe) goes to RESULTS/serve-raw.jsonl as it is measured, and also to $OUT/ when the device tool
# sets $OUT, so a call cut at its limit still returns what it measured (re-render: serve_table.py < serve-raw.jsonl).
# The whole call keeps within --budget seconds (default 540): LoraKit runs get `timeout` min(--run-timeout, what is
# left); the HF peer starts no run that would likely end past what is left (its --budget-s). A run that fails or
# times out becomes an error row; a run the budget leaves out becomes a "skipped" row.
# --quick: the tiny fixture llama, 8 requests of 16-32 prompt + 8-12 new tokens, batch 4: a smoke test of the whole
# pipeline in about a minute. --dry-run prints the commands and runs nothing (no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."

quick=0 hf=1 lorakit=1 dry=0 budget=540 run_timeout=150 loads="A,B128,B512" adapters_a="0,32,1,8,1000" adapters_b="0,32"
hf_only="eager,compiled,peft" lorakit_args="" hf_args="" results="bench/results"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --no-hf|--only-lorakit) hf=0 ;;
    --no-lorakit|--only-hf) lorakit=0 ;;
    --dry-run) dry=1 ;;
    --budget) budget=$2; shift ;;
    --run-timeout) run_timeout=$2; shift ;;
    --loads) loads=$2; shift ;;
    --adapters-a) adapters_a=$2; shift ;;
    --adapters-b) adapters_b=$2; shift ;;
    --hf-only) hf_only=$2; shift ;;
    --lorakit-args) lorakit_args=$2; shift ;;
    --hf-args) hf_args=$2; shift ;;
    --results) results=$2; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "run_serve_bench: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done
has_load() { [[ ",$loads," == *",$1,"* ]]; }
for l in ${loads//,/ }; do
  case "$l" in A|B128|B512) ;; *) echo "run_serve_bench: --loads takes A, B128, B512; got $l" >&2; exit 2 ;; esac
done

# load -> "requests prompt_tokens new_tokens" (bench/hf_serve_peer.py's LOADS and QUICK_LOADS)
declare -A shape
if [ $quick = 1 ]; then
  shape=([A]="8 16 8" [B128]="8 16 12" [B512]="8 32 12"); max_batch=4
  model=fixtures/models/llama; hf_quick="--quick --model $model"
else
  shape=([A]="64 128 64" [B128]="256 128 128" [B512]="256 512 128"); max_batch=32
  model=/tmp/lorakit-bench/llama-1b; hf_quick=""
fi

mkdir -p "$results"
raw="$results/serve-raw.jsonl"
logs=/tmp/lorakit-serve-logs
sinks=("$raw")
if [ -n "${OUT:-}" ]; then sinks+=("$OUT/serve-raw.jsonl"); fi
if [ $dry = 0 ]; then
  : > "$raw"; rm -rf "$logs"; mkdir -p "$logs"
  if [ -n "${OUT:-}" ]; then : > "$OUT/serve-raw.jsonl"; fi
fi
emit() { if [ $dry = 1 ]; then echo "(row) $1"; else printf '%s\n' "$1" | tee -a "${sinks[@]}"; fi; }
left() { echo $(( budget - SECONDS )); }
say() { echo "[run_serve_bench ${SECONDS}s] $*" >&2; }

# 1. model
if [ $quick = 0 ]; then
  say "prepare llama-1b"
  if [ $dry = 1 ]; then echo "+ python3 -c 'run_bench.prepare(\"llama-1b\")'; cp tokenizer files to $model"
  else
    python3 -c "import sys; sys.path.insert(0, 'bench'); import run_bench; run_bench.prepare('llama-1b')" || { echo "prepare failed" >&2; exit 1; }
    cp fixtures/models/llama/tokenizer.json fixtures/models/llama/tokenizer_config.json "$model/"
  fi
fi

# 2. copy-rate probe
gpu="unknown GPU"
if [ $dry = 1 ]; then echo "+ python3 (1 GiB device copy probe)"
else
  probe=$(python3 - <<'EOF'
import json, torch
n = 1 << 30
x = torch.empty(n, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end, reps = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), 20
torch.cuda.synchronize()
start.record()
for _ in range(reps):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
dt = start.elapsed_time(end) / 1e3 / reps
# copy_gbps counts bytes read + written (the device's memory traffic); one_way_gbps counts each copied byte once.
print(json.dumps(dict(probe="copy", bytes=n, reps=reps, copy_gbps=round(2 * n / dt / 1e9, 1),
                      one_way_gbps=round(n / dt / 1e9, 1), gpu=torch.cuda.get_device_name(0))))
EOF
) && emit "$probe" || say "copy probe failed (the table will have no floor row)"
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  gpu=${gpu:-unknown GPU}
fi

# One LoraKit bench-serve run -> one row (its last JSON line, or an error / skipped row).
lorakit_run() {
  local load=$1 k=$2 n p t
  read -r n p t <<< "${shape[$load]}"
  local tags=(system=lorakit "load=$load" "adapters=$k" "requests=$n" "prompt_tokens=$p" "new_tokens=$t" "batch=$max_batch")
  local cmd=(bash .gpu/on-gpu.sh LoraKit.Cli bench-serve --model "$model" --adapters "$k" --requests "$n" --prompt-tokens "$p"
             --max-tokens "$t" --max-batch "$max_batch" --device cuda --max-gpu-adapters 32 --max-cpu-adapters 1000 $lorakit_args)
  local to=$(( $(left) < run_timeout ? $(left) : run_timeout ))
  if [ $dry = 1 ]; then echo "+ timeout $to ${cmd[*]} | tail -1"; return; fi
  if [ "$to" -lt 15 ]; then
    emit "$(python3 bench/serve_table.py --annotate "${tags[@]}" skipped=budget < /dev/null)"
    return
  fi
  say "lorakit load $load, $k adapters (timeout ${to}s)"
  local out="$logs/lorakit-$load-$k.out" err="$logs/lorakit-$load-$k.err" rc=0
  timeout -k 10 "$to" "${cmd[@]}" > "$out" 2> "$err" || rc=$?
  emit "$(grep '^{' "$out" | tail -1 | python3 bench/serve_table.py --annotate "${tags[@]}" --rc "$rc" --stderr "$err")"
}

hf_run() {
  local which=$1
  local cmd=(python3 bench/hf_serve_peer.py --loads "$which" --only "$hf_only" --budget-s "$(left)" $hf_quick $hf_args)
  if [ $dry = 1 ]; then echo "+ ${cmd[*]}"; return; fi
  if [ "$(left)" -lt 30 ]; then say "HF $which: no time left"; return; fi
  say "HF peer, loads $which"
  "${cmd[@]}" 2>> "$logs/hf.err" | while IFS= read -r line; do emit "$line"; done
  [ "${PIPESTATUS[0]}" = 0 ] || { say "HF peer exited non-zero; last stderr:"; tail -5 "$logs/hf.err" >&2; }
}

b_loads=$(echo "$loads" | tr ',' '\n' | grep -v '^A$' | paste -sd, -)
# 3-4. load A
if has_load A; then
  [ $lorakit = 1 ] && for k in ${adapters_a//,/ }; do lorakit_run A "$k"; done
  [ $hf = 1 ] && hf_run A
fi
# 5-6. loads B
if [ -n "$b_loads" ]; then
  [ $lorakit = 1 ] && for l in ${b_loads//,/ }; do for k in ${adapters_b//,/ }; do lorakit_run "$l" "$k"; done; done
  [ $hf = 1 ] && hf_run "$b_loads"
fi

# 7. table
table=(python3 bench/serve_table.py --gpu "$gpu" --out "$results/serve.json" --markdown "$results/serve-table.md")
if [ $dry = 1 ]; then echo "+ ${table[*]} < $raw"; exit 0; fi
"${table[@]}" < "$raw"
if [ -n "${OUT:-}" ]; then
  cp "$results/serve.json" "$results/serve-table.md" "$OUT/" 2>/dev/null
  mkdir -p "$OUT/serve-logs" && cp "$logs"/* "$OUT/serve-logs/" 2>/dev/null
fi
say "done"
