#!/usr/bin/env bash
# Training determinism on CUDA with LoRA dropout (issue 16 item 19: each run draws dropout from its own seeded
# generator, saved in checkpoints): a straight 6-step run, and a 3-step run extended to 6 with --resume, must write
# bitwise-identical adapters; a second straight run with the same seed too. Also: eval-mode scoring with a dropout
# adapter is deterministic on CUDA (item 6).
# usage (GPU machine, repo root, .gpu carried): bash scripts/gpu/check_cuda_resume.sh OUT.json
set -euo pipefail
out=${1:?usage: check_cuda_resume.sh OUT.json}
run() { bash .gpu/on-gpu.sh LoraKit.Cli "$@"; }
common=(--model fixtures/models/llama --data fixtures/training/data.jsonl --batch-size 2 --lr 1e-2 --lora-dropout 0.1
        --schedule constant --save-every 1 --seed 7 --r 4 --device cuda --dtype bf16)
rm -rf /tmp/cr && mkdir -p /tmp/cr
run train "${common[@]}" --output /tmp/cr/straight --steps 6 >/tmp/cr/straight.log 2>&1
run train "${common[@]}" --output /tmp/cr/again --steps 6 >/tmp/cr/again.log 2>&1
run train "${common[@]}" --output /tmp/cr/resumed --steps 3 >/tmp/cr/first.log 2>&1
run train --output /tmp/cr/resumed --resume --steps 6 >/tmp/cr/resumed.log 2>&1
s1=$(run score --model fixtures/models/llama --adapter /tmp/cr/straight/adapter --text "reset my password" --json --device cuda --dtype bf16 | python3 -c 'import json,sys; print(json.load(sys.stdin)["loss"])')
s2=$(run score --model fixtures/models/llama --adapter /tmp/cr/straight/adapter --text "reset my password" --json --device cuda --dtype bf16 | python3 -c 'import json,sys; print(json.load(sys.stdin)["loss"])')
python3 - "$out" "$s1" "$s2" <<'PY'
import json, sys
from safetensors.torch import load_file
def ad(d): return load_file(f"/tmp/cr/{d}/adapter/adapter_model.safetensors")
a, b, c = ad("straight"), ad("again"), ad("resumed")
same = lambda x, y: x.keys() == y.keys() and all((x[k] == y[k]).all().item() for k in x)
res = {"same_seed_bitwise": same(a, b), "resumed_equals_straight_bitwise": same(a, c),
       "score_loss_twice": [float(sys.argv[2]), float(sys.argv[3])], "score_deterministic": sys.argv[2] == sys.argv[3]}
print(json.dumps(res, indent=1)); json.dump(res, open(sys.argv[1], "w"), indent=1)
sys.exit(0 if all(v for k, v in res.items() if isinstance(v, bool)) else 1)
PY
