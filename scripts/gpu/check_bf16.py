"""bf16 CUDA check: LoraKit (packed CLI) against transformers on the same GPU, for every fixture architecture.

Run on the GPU machine from the repo root after ../shared/gpu/pack.sh (carry .gpu):
    python3 scripts/gpu/check_bf16.py [OUT.json]
Prints a table of relative logit errors (max |a-b| / max |b|, last position) and greedy-id agreement.
"""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def cli(*args):
    r = subprocess.run(["bash", ".gpu/on-gpu.sh", "LoraKit.Cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"lorakit {' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


rows = []
for arch in ARCHS:
    d = f"fixtures/models/{arch}"
    ref = json.load(open(f"fixtures/reference/{arch}.json"))
    text = ref["texts"][2]["text"]
    tok = PreTrainedTokenizerFast.from_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = torch.tensor([tok(text)["input_ids"]]).cuda()
    with torch.no_grad():
        out = hf(ids, labels=ids)
    hf_last = out.logits[0, -1].float().cpu()
    hf32 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_last = hf32(ids.cpu()).logits[0, -1]
    lk = cli("score", "--model", d, "--text", text, "--device", "cuda", "--dtype", "bf16", "--json")
    lk_last = torch.tensor(lk["last_logits"])
    prompt = ref["generations"][0]["prompt"]
    p = tok(prompt, return_tensors="pt").to("cuda")
    with torch.no_grad():
        hf_gen = hf.generate(**p, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    hf_ids = hf_gen[0, p["input_ids"].shape[1]:].tolist()
    lk_gen = cli("generate", "--model", d, "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "0",
                 "--device", "cuda", "--dtype", "bf16", "--json")
    agree = next(
        (i for i, (a, b) in enumerate(zip(hf_ids, lk_gen["output_ids"])) if a != b), min(len(hf_ids), len(lk_gen["output_ids"])))
    rows.append({"arch": arch, "tokens": ids.shape[1], "rel_vs_hf_bf16": rel(lk_last, hf_last),
                 "rel_vs_fp32": rel(lk_last, ref_last), "hf_bf16_rel_vs_fp32": rel(hf_last, ref_last),
                 "loss_lorakit": lk["loss"], "loss_hf_bf16": out.loss.item(),
                 "greedy_ids_agree_first_n": agree, "greedy_len": len(hf_ids)})

print(f"{'arch':8} {'tokens':>6} {'rel vs HF bf16':>15} {'rel vs fp32':>12} {'HF bf16 vs fp32':>16} {'loss LK':>9} {'loss HF':>9} {'greedy agree':>13}")
for r in rows:
    print(f"{r['arch']:8} {r['tokens']:>6} {r['rel_vs_hf_bf16']:>15.2e} {r['rel_vs_fp32']:>12.2e} {r['hf_bf16_rel_vs_fp32']:>16.2e} "
          f"{r['loss_lorakit']:>9.4f} {r['loss_hf_bf16']:>9.4f} {r['greedy_ids_agree_first_n']:>6}/{r['greedy_len']}")
print("device:", torch.cuda.get_device_name(0))
if len(sys.argv) > 1:
    json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, open(sys.argv[1], "w"), indent=1)
ok = all(r["rel_vs_hf_bf16"] <= 1e-2 for r in rows)
print("PASS" if ok else "FAIL", "(bf16 tolerance 1e-2)")
sys.exit(0 if ok else 1)
