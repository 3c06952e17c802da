#!/usr/bin/env bash
# A real `lorakit train` run in bf16 on the GPU machine: the random-init Llama-3.2-1B-shape model that
# bench/run_bench.py saved (same weights HF trained), the fixture Llama-3 tokenizer, and a generated routing dataset.
# usage (GPU machine, repo root, .gpu carried): bash scripts/gpu/train_run.sh OUT_DIR [STEPS]
set -euo pipefail
out=${1:?usage: train_run.sh OUT_DIR [STEPS]}; steps=${2:-300}
model=/tmp/lorakit-bench/llama-1b
[ -f "$model/config.json" ] || { echo "run bench/run_bench.py first (it saves $model)"; exit 1; }
cp fixtures/models/llama/tokenizer.json fixtures/models/llama/tokenizer_config.json "$model/"
python3 - <<'PY'
import json, random
random.seed(0)
intents = {"accounts": ["reset my password", "change my email", "I cannot log in", "delete my account"],
           "billing": ["my invoice is wrong", "I was charged twice", "refund my payment", "update my credit card"],
           "shipping": ["where is my package", "track my order", "the delivery is late", "the parcel never arrived"],
           "returns": ["return this item", "the product is broken", "send the item back", "the item arrived damaged"]}
pre = ["", "hi,", "hello,", "urgent:", "quick question:", "please help,"]
post = ["", "please", "thanks", "today", "as soon as possible"]
rows = [(f"Request: {' '.join(x for x in (p, ph, s) if x)}\nTeam:", " " + label)
        for label, phs in intents.items() for ph in phs for p in pre for s in post]
random.shuffle(rows)
with open("/tmp/train.jsonl", "w") as f:
    for pr, c in rows[:400]: f.write(json.dumps({"prompt": pr, "completion": c}) + "\n")
with open("/tmp/valid.jsonl", "w") as f:
    for pr, c in rows[400:]: f.write(json.dumps({"prompt": pr, "completion": c}) + "\n")
PY
rm -rf /tmp/train1b
start=$(date +%s)
bash .gpu/on-gpu.sh LoraKit.Cli train --model "$model" --data /tmp/train.jsonl --validation-data /tmp/valid.jsonl \
  --output /tmp/train1b --steps "$steps" --batch-size 16 --max-length 128 --lr 2e-4 --warmup-steps 20 \
  --eval-every 50 --device cuda --dtype bf16 --log-every 25
echo "wall: $(( $(date +%s) - start )) s"
mkdir -p "$out"
cp /tmp/train1b/report.json /tmp/train1b/report.html /tmp/train1b/loss.png /tmp/train1b/metrics.jsonl "$out/"
ls -la /tmp/train1b /tmp/train1b/adapter
