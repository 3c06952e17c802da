#!/usr/bin/env bash
# Multi-GPU data-parallel training (issue 23) on the multi-GPU machine, from the repo root after bench/pack.sh (carry .gpu):
#   bash bench/run_multigpu_bench.sh [--phases prepare,scale,trajectory,kill] [--gpus 1,2,4,8] [--steps 12] [--warmup 4]
#                                    [--budget 560] [--results DIR] [--quick] [--dry-run]
# Phases (each appends rows to RESULTS/multigpu-raw.jsonl, and to $OUT/ when the device tool sets it):
#   prepare     the random-init Llama-3-8B-shape and Llama-3.2-1B-shape models of bench/run_bench.py (prepare()) with the
#               fixture tokenizer, and seeded random-word data whose rows truncate to exactly 2048 tokens;
#   scale       llama-8b, 2 × 2048 tokens per GPU, gradient checkpointing, LoRA r=16 on the seven projections, no dropout,
#               offload off (PCIe shared by 8 ranks would measure the host, not the scaling): `lorakit train --gpus N` for
#               each N of --gpus that is visible; tokens/s over the steps after --warmup, from rank 0's metrics.jsonl;
#   trajectory  llama-1b: 2 GPUs × batch 1 vs 1 GPU × batch 2, 6 steps: per-step losses within 1e-2 (bf16) and the
#               adapters' relative L2 difference within 5e-2;
#   kill        llama-1b, 2 GPUs: SIGKILL rank 1 after the first checkpoint; the launcher must end the group within 60 s
#               with one line, and the last checkpoint must resume in one process. Then the same without the launcher
#               (torchrun-style variables, LORAKIT_NCCL_TIMEOUT=45): rank 0's watchdog must end it within 120 s.
# Finally bench/multigpu_bench.py table -> RESULTS/multigpu.json and RESULTS/multigpu.md (and stdout).
# One device call is 10 minutes at most: preparing the 8B model takes a few of them. Suggested calls:
#   1) --phases prepare,scale --gpus 1,2      2) --phases scale --gpus 4,8      3) --phases trajectory,kill
# (the machine keeps /tmp while it stays warm; the raw rows come back through $OUT: commit them into bench/results/
# before the next call so its table includes them, or merge the raw files by hand).
# --quick: the tiny fixture llama on CPU ranks (the store's collectives), a few steps: the script's logic without GPUs.
set -uo pipefail
cd "$(dirname "$0")/.."

phases="prepare,scale,trajectory,kill" gpus="1,2,4,8" steps=12 warmup=4 budget=560 results="bench/results" quick=0 dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --phases) phases=$2; shift ;;
    --gpus) gpus=$2; shift ;;
    --steps) steps=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --budget) budget=$2; shift ;;
    --results) results=$2; shift ;;
    --quick) quick=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "run_multigpu_bench: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done
has() { [[ ",$phases," == *",$1,"* ]]; }
start=$SECONDS
left() { echo $(( budget - (SECONDS - start) )); }
work=/tmp/lorakit-mgpu
mkdir -p "$work" "$results"
raw="$results/multigpu-raw.jsonl"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}   # NVLink multicast stays off on the shared machines
emit() {  # one JSON row: to the raw file, to $OUT, to stdout (a helper that printed nothing becomes an error row)
  local row=$1; [ -z "$row" ] && row='{"error":"a bench/multigpu_bench.py step failed (its traceback is above)"}'
  echo "$row" >> "$raw"
  [ -n "${OUT:-}" ] && cp "$raw" "$OUT/" 2>/dev/null
  echo "row: $row"
}
run() {  # echo the command; run it unless --dry-run
  echo "+ $*" >&2
  [ $dry = 1 ] && return 0
  "$@"
}

if [ $quick = 1 ]; then
  cli=(dotnet tests/LoraKit.Tests/bin/Release/net10.0/LoraKit.Cli.dll)
  big=fixtures/models/llama small=fixtures/models/llama device=cpu maxlen=64 visible=8
  common=(--r 4 --lora-alpha 8)
else
  cli=(bash .gpu/on-gpu.sh LoraKit.Cli)
  big=/tmp/lorakit-bench/llama-8b small=/tmp/lorakit-bench/llama-1b device=cuda maxlen=2048
  visible=$(nvidia-smi -L 2>/dev/null | wc -l)
  common=(--r 16 --lora-alpha 32 --offload-checkpoints off --embeddings-on-host off)
fi
data="$work/data.jsonl"
train() {  # train OUTPUT GPUS BATCH STEPS MODEL [more args]: one run, fresh output
  local out=$1 n=$2 b=$3 s=$4 m=$5; shift 5
  rm -rf "$out"
  local g=(); [ "$n" -gt 1 ] && g=(--gpus "$n")
  run timeout "$(left)" "${cli[@]}" train --model "$m" --data "$data" --output "$out" --steps "$s" --batch-size "$b" \
    --max-length $maxlen --lora-dropout 0 --device $device --log-every 1 --save-every "$s" --registry "$work/registry" \
    "${common[@]}" "${g[@]}" "$@"
}

if has prepare; then
  if [ $quick = 0 ]; then
    run python3 -c "import sys; sys.path.insert(0, 'bench'); import run_bench; run_bench.prepare('llama-8b'); run_bench.prepare('llama-1b')" || emit '{"check":"prepare","error":"model preparation failed"}'
    for d in "$big" "$small"; do run cp fixtures/models/llama/tokenizer.json fixtures/models/llama/tokenizer_config.json "$d/"; done
    run python3 bench/multigpu_bench.py data "$data"
  else
    run python3 bench/multigpu_bench.py data "$data" --lines 64 --words 80
  fi
fi

if has scale; then
  for n in ${gpus//,/ }; do
    if [ "$n" -gt "$visible" ]; then emit "{\"check\":\"scale\",\"gpus\":$n,\"skipped\":\"only $visible visible\"}"; continue; fi
    if [ "$(left)" -lt 60 ]; then emit "{\"check\":\"scale\",\"gpus\":$n,\"skipped\":\"budget\"}"; continue; fi
    out="$work/scale-$n"
    extra=(--gradient-checkpointing); [ $quick = 1 ] && extra=()
    if train "$out" "$n" 2 "$steps" "$big" "${extra[@]}" > "$work/scale-$n.log" 2>&1; then
      [ $dry = 1 ] || emit "$(python3 bench/multigpu_bench.py rate "$out" --gpus "$n" --warmup "$warmup")"
    else
      emit "{\"check\":\"scale\",\"gpus\":$n,\"error\":$(tail -c 400 "$work/scale-$n.log" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
    fi
  done
fi

if has trajectory && [ "$visible" -ge 2 ]; then
  ok=1
  train "$work/traj-dp" 2 1 6 "$small" > "$work/traj-dp.log" 2>&1 || ok=0
  train "$work/traj-one" 1 2 6 "$small" > "$work/traj-one.log" 2>&1 || ok=0
  if [ $dry = 1 ]; then :
  elif [ $ok = 1 ]; then emit "$(python3 bench/multigpu_bench.py trajectory "$work/traj-dp" "$work/traj-one" --gpus 2)"
  else emit "{\"check\":\"trajectory\",\"error\":$(tail -c 400 "$work/traj-dp.log" "$work/traj-one.log" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
  fi
fi

# The pid of rank R among the children of PARENT (its environment names the rank).
rank_pid() {
  local parent=$1 r=$2
  for p in $(pgrep -P "$parent"); do tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "RANK=$r" && { echo "$p"; return; }; done
}
wait_checkpoint() {  # wait_checkpoint OUTPUT PID: until a complete checkpoint exists (or the process ended, or 240 s)
  local t=0
  until ls "$1"/checkpoints/*/COMPLETE >/dev/null 2>&1 || ! kill -0 "$2" 2>/dev/null || [ $t -ge 2400 ]; do sleep 0.1; t=$((t + 1)); done
}

if has kill && [ "$visible" -ge 2 ] && [ $dry = 0 ]; then
  out="$work/kill"; rm -rf "$out"
  "${cli[@]}" train --model "$small" --data "$data" --output "$out" --steps 100000 --batch-size 2 --max-length $maxlen --lora-dropout 0 \
    --device $device --save-every 3 --registry "$work/registry" "${common[@]}" --gpus 2 > "$work/kill.log" 2> "$work/kill.err" &
  launcher=$!
  wait_checkpoint "$out" $launcher
  victim=$(rank_pid $launcher 1)
  if [ -z "$victim" ]; then
    emit "{\"check\":\"kill\",\"error\":\"rank 1 not found (launcher ended: $(kill -0 $launcher 2>/dev/null && echo no || echo yes))\"}"
    kill -9 $launcher 2>/dev/null
  else
    t0=$(date +%s.%N); kill -9 "$victim"
    for i in $(seq 600); do kill -0 $launcher 2>/dev/null || break; sleep 0.1; done
    t1=$(date +%s.%N); alive=$(kill -0 $launcher 2>/dev/null && echo 1 || echo 0)
    [ "$alive" = 1 ] && kill -9 $launcher
    wait $launcher; code=$?
    line=$(grep -m1 "^error: rank" "$work/kill.err")
    ckpt=$(ls -d "$out"/checkpoints/*/ | tail -1); step=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d.get('step', d.get('Step', 0)))" "$ckpt/trainer_state.json" 2>/dev/null || echo 0)
    timeout "$(left)" "${cli[@]}" train --model "$small" --data "$data" --output "$out" --steps $((step + 1)) --batch-size 2 --max-length $maxlen \
      --lora-dropout 0 --device $device --registry "$work/registry" "${common[@]}" --resume > "$work/kill-resume.log" 2>&1; rc=$?
    emit "$(python3 -c 'import json,sys; a=sys.argv; print(json.dumps(dict(check="kill", group_exit_code=int(a[1]), seconds_to_exit=round(float(a[3])-float(a[2]),2), still_running_after_60s=a[4]=="1", message=a[5], resumed_from_step=int(a[6]), resume_exit_code=int(a[7]), passed=a[4]=="0" and int(a[1])!=0 and a[5].startswith("error: rank 1") and a[7]=="0")))' \
      "$code" "$t0" "$t1" "$alive" "$line" "$step" "$rc")"
  fi

  # Without the launcher (torchrun's variables): only the watchdog stands between rank 0 and a hang.
  out="$work/watchdog"; rm -rf "$out"; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  pids=()
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port LORAKIT_NCCL_TIMEOUT=45 \
      "${cli[@]}" train --model "$small" --data "$data" --output "$out" --steps 100000 --batch-size 2 --max-length $maxlen --lora-dropout 0 \
      --device $device --save-every 3 --registry "$work/registry" "${common[@]}" > "$work/watchdog-$r.log" 2>&1 &
    pids+=($!)
  done
  wait_checkpoint "$out" "${pids[0]}"
  t0=$(date +%s.%N); kill -9 "${pids[1]}"
  for i in $(seq 1200); do kill -0 "${pids[0]}" 2>/dev/null || break; sleep 0.1; done
  t1=$(date +%s.%N); alive=$(kill -0 "${pids[0]}" 2>/dev/null && echo 1 || echo 0)
  [ "$alive" = 1 ] && kill -9 "${pids[0]}"
  wait "${pids[0]}"; code=$?
  line=$(grep -m1 "^rank 0:\|^error:" "$work/watchdog-0.log")
  emit "$(python3 -c 'import json,sys; a=sys.argv; print(json.dumps(dict(check="watchdog", rank0_exit_code=int(a[1]), seconds_to_exit=round(float(a[3])-float(a[2]),2), still_running_after_120s=a[4]=="1", message=a[5], passed=a[4]=="0" and int(a[1])!=0)))' \
    "$code" "$t0" "$t1" "$alive" "$line")"
fi

[ $dry = 1 ] && exit 0
python3 bench/multigpu_bench.py table "$raw" "$results"
[ -n "${OUT:-}" ] && cp "$results"/multigpu.json "$results"/multigpu.md "$raw" "$OUT/" 2>/dev/null
exit 0
