"""transformers and PEFT read LoraKit's classification adapters and merges with the same logits (issue 16 item 14).
Run on the GPU machine (torch, transformers, peft installed; no GPU needed) with the packed CLI (.gpu), repo root:
    ../shared/gpu/pack.sh src/LoraKit.Cli/LoraKit.Cli.csproj   # on the dev machine, then carry .gpu
    python3 scripts/gpu/check_classify_merge.py [OUT.json]
For each fixture architecture: `lorakit train` a tiny sequence-classification adapter ({"text","label"} data, a few
steps), then compare, per text, LoraKit's `classify --json` logits (fp32, CPU) with
  (1) PEFT: AutoModelForSequenceClassification(base) + PeftModel.from_pretrained(LoraKit adapter) (LoRA + score head
      from modules_to_save), config.pad_token_id set as LoraKit pools (tokenizer pad token, else config pad_token_id);
  (2) transformers: AutoModelForSequenceClassification.from_pretrained(LoraKit `merge` output), as it is;
  (3) the same two, batched with right padding where the model has a pad token (pooling: last non-pad token).
Texts include one ending in pad tokens where there is one (transformers pools the token before them).
Prints a table; exit 1 past 1e-4 (relative to max |logit|).
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
PHRASES = {"accounts": ["reset my password", "change my email"], "billing": ["my invoice is wrong", "refund my payment"],
           "other": ["what time is it", "tell me a joke"]}
PRE, POST = ["", "hi, ", "please: ", "urgent: "], ["", " thanks", " today"]
TEXTS = ["refund my payment thanks", "hi, reset my password", "Intent routing: what time is it today? Tell me, please.", "x"]


def cli(*args):
    r = subprocess.run(["bash", ".gpu/on-gpu.sh", "LoraKit.Cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"lorakit {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def logits_of(model, tok, texts, pad_id, batched):
    with torch.no_grad():
        if batched:
            enc = tok(texts, padding=True, return_tensors="pt")
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        return torch.cat([model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits.float() for t in texts])


work = tempfile.mkdtemp()
data = os.path.join(work, "train.jsonl")
with open(data, "w") as f:
    for label, phrases in PHRASES.items():
        for ph in phrases:
            for p in PRE:
                for q in POST:
                    f.write(json.dumps({"text": p + ph + q, "label": label}) + "\n")

rows = []
for arch in ARCHS:
    m = f"fixtures/models/{arch}"
    run = os.path.join(work, f"{arch}-run")
    cli("train", "--model", m, "--data", data, "--output", run, "--steps", "8", "--batch-size", "8", "--lr", "2e-2",
        "--lora-dropout", "0.1", "--device", "cpu")
    adapter = os.path.join(run, "adapter")
    merged = os.path.join(work, f"{arch}-merged")
    cli("merge", "--no-gate", "--model", m, "--adapter", adapter, "--output", merged, "--device", "cpu", "--dtype", "fp32")

    tok = PreTrainedTokenizerFast.from_pretrained(m)
    tok.padding_side = "right"  # as LoraKit batches (positions start at 0 in every row)
    base_cfg = json.load(open(os.path.join(m, "config.json")))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else base_cfg.get("pad_token_id")
    texts = TEXTS + ([TEXTS[0] + tok.pad_token + tok.pad_token] if tok.pad_token is not None else [])
    lk_out = []
    for t in texts:
        j = json.loads(cli("classify", "--model", m, "--adapter", adapter, "--text", t, "--json", "--device", "cpu", "--dtype", "fp32"))
        assert j["pad_token_id"] == pad_id, (j["pad_token_id"], pad_id)
        lk_out.append(j["predictions"][0]["logits"])
    labels = j["labels"]
    lk = torch.tensor(lk_out)

    base = AutoModelForSequenceClassification.from_pretrained(
        m, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    base.config.pad_token_id = pad_id
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    assert [hf.config.id2label[i] for i in range(len(labels))] == labels, hf.config.id2label
    assert hf.config.pad_token_id == pad_id, (hf.config.pad_token_id, pad_id)

    row = {"arch": arch, "pad_token_id": pad_id, "labels": labels,
           "peft_rel": rel(logits_of(peft_model, tok, texts, pad_id, False), lk),
           "merged_rel": rel(logits_of(hf, tok, texts, pad_id, False), lk)}
    if pad_id is not None and tok.pad_token is not None:  # transformers refuses batches > 1 without a pad token
        row["peft_batched_rel"] = rel(logits_of(peft_model, tok, texts, pad_id, True), lk)
        row["merged_batched_rel"] = rel(logits_of(hf, tok, texts, pad_id, True), lk)
    rows.append(row)

cols = ["peft_rel", "merged_rel", "peft_batched_rel", "merged_batched_rel"]
print(f"{'arch':8} {'pad':>5} " + " ".join(f"{c:>20}" for c in cols))
for r in rows:
    print(f"{r['arch']:8} {str(r['pad_token_id']):>5} " + " ".join(f"{r[c]:>20.2e}" if c in r else f"{'n/a':>20}" for c in cols))
ok = all(r[c] <= 1e-4 for r in rows for c in cols if c in r)
if len(sys.argv) > 1:
    json.dump({"rows": rows, "pass": ok}, open(sys.argv[1], "w"), indent=1)
print("PASS" if ok else "FAIL", "(fp32 tolerance 1e-4, relative to max |logit|)")
sys.exit(0 if ok else 1)
