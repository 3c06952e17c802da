"""How far apart are transformers' own bf16 Phi-3 logits with eager attention (the fixtures) and with SDPA (its default)?
Run on the GPU machine from the repo root: python3 scripts/gpu/check_phi3_bf16_attention.py [OUT_DIR]
(with OUT_DIR it also writes <arch>_bf16_sdpa.safetensors there, for fixtures/reference/: see write_sdpa_fixtures)
Prints, per fixture text, max|a-b|/max|b| at the last position and over all positions, for sdpa vs eager bf16 and for
each vs fp32 (eager), so LoraKit's bf16 distance (FamilyCudaTests) can be read against transformers' own spread."""
import json
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


for arch in ["phi3", "phi4mini", "qwen2"]:
    ref = json.load(open(f"fixtures/reference/{arch}.json"))
    t = load_file(f"fixtures/reference/{arch}.safetensors")
    models = {impl: AutoModelForCausalLM.from_pretrained(f"fixtures/models/{arch}", dtype=torch.bfloat16, attn_implementation=impl).cuda().eval()
              for impl in ("eager", "sdpa")}
    for i, text in enumerate(ref["texts"]):
        ids = torch.tensor([text["input_ids"]]).cuda()
        with torch.no_grad():
            out = {k: m(ids).logits[0].float().cpu() for k, m in models.items()}
        fix, fp32 = t[f"logits_bf16_{i}"].float(), t[f"logits_{i}"].float()
        print(f"{arch} text {i}: sdpa vs eager-fixture last {rel(out['sdpa'][-1], fix[-1]):.2e} all {rel(out['sdpa'], fix):.2e}; "
              f"eager rerun vs fixture all {rel(out['eager'], fix):.2e}; vs fp32 all: sdpa {rel(out['sdpa'], fp32):.2e} eager {rel(fix, fp32):.2e}", flush=True)


def write_sdpa_fixtures(out_dir):
    """fixtures/reference/<arch>_bf16_sdpa.safetensors: transformers' bf16 logits with SDPA, its default attention, for
    the families whose reference fixtures were made with eager attention but which LoraKit runs with SDPA (Phi-3)."""
    import os
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    for arch in ["phi3", "phi4mini"]:
        ref = json.load(open(f"fixtures/reference/{arch}.json"))
        m = AutoModelForCausalLM.from_pretrained(f"fixtures/models/{arch}", dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
        tensors = {}
        for i, text in enumerate(ref["texts"]):
            with torch.no_grad():
                tensors[f"logits_bf16_sdpa_{i}"] = m(torch.tensor([text["input_ids"]]).cuda()).logits[0].float().cpu().contiguous()
        save_file(tensors, os.path.join(out_dir, f"{arch}_bf16_sdpa.safetensors"))
        print("wrote", arch)


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1:
        write_sdpa_fixtures(sys.argv[1])
