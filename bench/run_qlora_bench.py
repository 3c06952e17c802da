"""QLoRA benchmark (issue 20) in one device call: LoraKit NF4 QLoRA against HF transformers + PEFT bf16 LoRA (eager).

bitsandbytes is not installed on the GPU machine, so HF's bf16 LoRA is the baseline the issue names. On the GPU machine,
from the repo root, after `bench/pack.sh` (carry .gpu):
    python3 bench/run_qlora_bench.py [--steps 10] [--no-70b] [--out bench/results/qlora.json]
Rows, same random-init llama-8b weights and batch as bench/run_bench.py (LoRA r=16, alpha 32, all seven projections):
  - HF + PEFT bf16 LoRA, 2 x 2048, gradient checkpointing (the baseline);
  - LoraKit bf16 LoRA, same workload and options (for the cost of the 4-bit base);
  - LoraKit NF4 (double quant) QLoRA, 2 x 2048 and 1 x 2048, gradient checkpointing, quantized as the bf16 checkpoint loads;
  - LoraKit NF4 QLoRA on a Llama-3-70B shape built on the device directly in NF4 (--random-init: each weight drawn and
    quantized at once, never the model in 16 bits), 1 x 2048 (and 2 x 2048), checkpointed.
LoraKit's QLoRA rows use --checkpoint-keep-gib 0 (nothing kept between forward and backward beyond the layer
checkpoints, which wait in host memory): the memory-lean setting QLoRA is for. Memory columns as in run_bench.py:
peak allocated (torch's caching allocator counter) and peak device memory in use.
Then `lorakit check-kernels` for the dequantization kernel's exactness and bandwidth.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_bench import LAUNCHER, WORK, hf_run, lorakit_run, prepare_batch  # noqa: E402

LLAMA_70B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=28672,
                 num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                 hidden_act="silu", bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")


def config_only(name, cfg):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def ids_file(b, s, vocab, name):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    path = os.path.join(WORK, f"ids-{name}-{b}x{s}.safetensors")
    save_file({"input_ids": torch.randint(0, vocab, (b, s))}, path)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-70b", action="store_true")
    ap.add_argument("--only-70b", action="store_true", help="only the 70B rows (a second call: the 8B rows and the 70B ones together pass the 10-minute limit of one call)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="bench/results/qlora.json")
    a = ap.parse_args()
    torch.cuda.init()
    rows = []

    def record(res, workload):
        res["workload"] = workload
        rows.append(res)
        print(json.dumps(res), flush=True)
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        json.dump({"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "rows": rows}, open(a.out, "w"), indent=1)

    nf4 = ["--quantize", "nf4", "--checkpoint-keep-gib", "0"]
    if not a.only_70b:
        d, ids, ids_path = prepare_batch("llama-8b", 2, 2048)
        w = "llama-8b 2x2048 ckpt"
        if not a.no_hf:
            record(hf_run(d, ids, True, a.steps, a.warmup), w)
        record(lorakit_run(d, ids_path, True, a.steps, a.warmup, keep_gib=2, label="bf16"), w)
        record(lorakit_run(d, ids_path, True, a.steps, a.warmup, extra=nf4, label="nf4"), w)
        _, _, ids1 = prepare_batch("llama-8b", 1, 2048)
        record(lorakit_run(d, ids1, True, a.steps, a.warmup, extra=nf4, label="nf4"), "llama-8b 1x2048 ckpt")
    if not a.no_70b:
        d70 = config_only("llama-70b-shape", LLAMA_70B)
        for b in (1, 2):
            p = ids_file(b, 2048, LLAMA_70B["vocab_size"], "llama-70b")
            record(lorakit_run(d70, p, True, 3, 2, extra=nf4 + ["--random-init"], label="nf4"), f"llama-70b {b}x2048 ckpt")
    print_table(rows)
    if a.only_70b:
        return
    r = subprocess.run(LAUNCHER + ["check-kernels", "--model", "fixtures/models/llama"], capture_output=True, text=True)
    print(r.stdout[-6000:], r.stderr[-2000:], flush=True)
    with open(os.path.splitext(a.out)[0] + "-check-kernels.txt", "w") as f:
        f.write(r.stdout)


def print_table(rows):
    hf = next((r for r in rows if r["system"] == "hf-peft"), None)
    print(f"\n{'workload':22} {'system':16} {'tok/s':>7} {'x HF':>6} {'alloc GiB':>9} {'x HF':>6} {'device GiB':>10} {'loss':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:22} {r['system']:16} ERROR {r['error'][-300:]}")
            continue
        t = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}" if hf else "-"
        m = f"{r['peak_mem_gib'] / hf['peak_mem_gib']:.2f}" if hf else "-"
        print(f"{r['workload']:22} {r['system']:16} {r['tokens_per_s']:>7} {t:>6} {r['peak_mem_gib']:>9.2f} {m:>6} {r['device_mem_gib']:>10.2f} {r['loss']:>8.4f}")
    print(f"GPU: {torch.cuda.get_device_name(0)}")


if __name__ == "__main__":
    main()
