"""PEFT and transformers read what LoraKit writes: run on the GPU machine (peft installed) with the packed CLI (.gpu).
    python3 scripts/gpu/check_peft_interop.py [OUT.json]
For each fixture architecture LoraKit (1) writes an adapter of its own computation (`combine`), which PEFT loads, and
(2) merges the PEFT fixture adapter into a full checkpoint (`merge`), which transformers loads. Logits are compared
with LoraKit's own `score --adapter` output (fp32, CPU on both sides). Prints a table; exit 1 past 1e-4.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TEXT = "Intent routing: reset my password goes to accounts; my invoice is wrong goes to billing."
COMBOS = {"llama": "a:0.7,b:0.3", "mistral": "a:0.5,a:0.25", "qwen2": "a:0.8", "qwen3": "regex:0.9,regex:0.5"}


def cli(*args):
    r = subprocess.run(["bash", ".gpu/on-gpu.sh", "LoraKit.Cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"lorakit {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


rows, work = [], tempfile.mkdtemp()
for arch, spec in COMBOS.items():
    m = f"fixtures/models/{arch}"
    adapters = ",".join(f"fixtures/adapters/{arch}/{p.split(':')[0]}:{p.split(':')[1]}" for p in spec.split(","))
    lk_adapter = os.path.join(work, f"{arch}-combined")
    cli("combine", "--model", m, "--adapters", adapters, "--method", "cat", "--output", lk_adapter, "--device", "cpu")
    merged = os.path.join(work, f"{arch}-merged")
    cli("merge", "--no-gate", "--model", m, "--adapter", f"fixtures/adapters/{arch}/a", "--output", merged, "--device", "cpu", "--dtype", "fp32")
    lk_combined = torch.tensor(json.loads(cli("score", "--model", m, "--adapter", lk_adapter, "--text", TEXT, "--device", "cpu", "--json"))["last_logits"])
    lk_a = torch.tensor(json.loads(cli("score", "--model", m, "--adapter", f"fixtures/adapters/{arch}/a", "--text", TEXT, "--device", "cpu", "--json"))["last_logits"])

    tok = PreTrainedTokenizerFast.from_pretrained(m)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, lk_adapter).eval()(ids).logits[0, -1]
        hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits[0, -1]
    rows.append({"arch": arch, "peft_loads_lorakit_adapter_rel": rel(peft_logits, lk_combined),
                 "transformers_loads_lorakit_merged_rel": rel(hf_merged, lk_a)})

print(f"{'arch':8} {'PEFT on LoraKit adapter':>24} {'transformers on LoraKit merge':>30}")
for r in rows:
    print(f"{r['arch']:8} {r['peft_loads_lorakit_adapter_rel']:>24.2e} {r['transformers_loads_lorakit_merged_rel']:>30.2e}")
ok = all(r["peft_loads_lorakit_adapter_rel"] <= 1e-4 and r["transformers_loads_lorakit_merged_rel"] <= 1e-4 for r in rows)
if len(sys.argv) > 1:
    json.dump({"rows": rows, "pass": ok}, open(sys.argv[1], "w"), indent=1)
print("PASS" if ok else "FAIL", "(fp32 tolerance 1e-4, relative to max |logit|)")
sys.exit(0 if ok else 1)
