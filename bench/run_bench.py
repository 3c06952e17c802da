"""LoraKit vs HF transformers + PEFT, LoRA training throughput and memory, in one device call.

On the GPU machine, from the repo root, after `bench/pack.sh` (carry .gpu):
    python3 bench/run_bench.py [--only llama-1b] [--steps 10] [--out bench/results/latest.json]
Per workload (the four of ../shared/bench/peft_reference.py): build the random-init model once with seed 0, save its
weights (safetensors) so LoraKit trains the very same model, draw one batch (saved too), run HF + PEFT in this process,
then `lorakit bench` as a subprocess. Same LoRA (r=16, alpha 32, all seven linear modules, no dropout), same AdamW,
labels = inputs. Step-1 losses must agree (bf16: 1e-2).
Memory, `peak_mem_gib`: peak bytes allocated by torch's CUDA caching allocator (torch.cuda.max_memory_allocated; for
LoraKit the same counter, read from libtorch through `Runtime/Cuda/CudaMemoryStats.cs`). HF's counts over the timed steps
(reset after warm-up); LoraKit's from its first step on, since the replays of its CUDA graph reuse blocks the allocator
counts as free, so only the eager and captured steps show a step's activations. Also, for both systems, the peak device
memory in use from model load to the last step (`device_mem_gib`: cudaMemGetInfo polled every 10 ms, minus the level
before loading; LoraKit's includes its own CUDA context, ~0.5 GiB, which HF's shares with this process).
"""
import argparse
import json
import os
import subprocess
import threading
import time

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "llama-1b": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                 rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen2-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                   tie_word_embeddings=True)),
    "llama-8b": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)),
}
WORKLOADS = [("llama-1b", 8, 1024, False), ("llama-1b", 4, 2048, True), ("qwen2-0.5b", 8, 1024, False), ("llama-8b", 2, 2048, True)]
# Layers whose kept gate/up LoraKit sends to host memory (--offload-mlp-layers): on llama-8b the PCIe link carries them
# beside the checkpoints; on llama-1b a layer's compute is too short for that (bench/NOTES.md).
OFFLOAD_MLP = {"llama-8b": 10}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORK = "/tmp/lorakit-bench"


class DevicePeak:
    """Peak device memory in use (all processes) while active, minus the level when it started."""

    def __init__(self):
        self.base = self.used()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used():
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.used())
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop = True
        self._t.join()

    @property
    def gib(self):
        return round((self.peak - self.base) / 2**30, 2)


def prepare(shape):
    d = os.path.join(WORK, shape)
    if not os.path.exists(os.path.join(d, "config.json")):
        cfg_cls, model_cls, kw = SHAPES[shape]
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**kw)).to(torch.bfloat16)
        model.save_pretrained(d)
        del model
    return d


def prepare_batch(shape, b, s):
    """The workload's model directory, its batch (seed 1) and the safetensors file LoraKit reads the batch from."""
    d = prepare(shape)
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPES[shape][2]["vocab_size"], (b, s))
    ids_path = os.path.join(WORK, f"ids-{shape}-{b}x{s}.safetensors")
    save_file({"input_ids": ids}, ids_path)
    return d, ids, ids_path


def hf_run(d, ids, ckpt, steps, warm, profile=False):
    dev = DevicePeak().__enter__()  # from before the model loads, as for LoraKit's process
    cfg_cls, model_cls, kw = SHAPES[os.path.basename(d)]
    model = model_cls.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.train()  # from_pretrained returns eval mode, in which transformers skips gradient checkpointing
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = ids.cuda()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = step().item()
    for _ in range(warm - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    dev.__exit__()
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    res = dict(system="hf-peft", tokens_per_s=round(ids.numel() / dt), step_s=round(dt, 4), loss=round(first, 4),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), device_mem_gib=dev.gib)
    del model, opt, params
    torch.cuda.empty_cache()
    return res


def old_app_launcher(tgz):
    """A second LoraKit build beside the packed one (A/B of two builds in one call, e.g. before/after a restructure):
    the packed app with the managed assemblies of `tgz` (LoraKit*.dll, LoraKit.Cli.deps.json, ...) laid over it."""
    subprocess.run(["bash", ".gpu/on-gpu.sh", "LoraKit.Cli", "--version"], capture_output=True)  # unpacks /tmp/gpuapp once
    old = "/tmp/gpuapp-old"
    subprocess.run(f"rm -rf {old} && mkdir -p {old} && cp -r /tmp/gpuapp/app {old}/ && tar xzf {tgz} -C {old}/app", shell=True, check=True)
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return ["env", f"LD_LIBRARY_PATH={lib}:{os.environ.get('LD_LIBRARY_PATH', '')}", f"LIBTORCH_DIR={lib}", f"{old}/app/LoraKit.Cli"]


LAUNCHER = ["bash", ".gpu/on-gpu.sh", "LoraKit.Cli"]


def lorakit_run(d, ids_path, ckpt, steps, warm, plain=False, kernels="fast", profile=False, keep_gib=None, graph="auto", main=False,
                embeddings="auto", extra=(), label="", memory_trace=False, offload_mlp=0, launcher=None):
    args = (launcher or LAUNCHER) + ["bench", "--model", d, "--ids", ids_path, "--steps", str(steps),
            "--warmup", str(warm), "--rank", "16", "--device", "cuda", "--kernels", kernels] + \
           (["--gradient-checkpointing"] if ckpt else []) + (["--plain-loss"] if plain else []) + (["--profile"] if profile else []) + \
           (["--checkpoint-keep-gib", str(keep_gib)] if keep_gib is not None and "--checkpoint-keep-gib" not in extra else []) + ["--cuda-graph", graph, "--embeddings-on-host", embeddings] + \
           (["--memory-trace"] if memory_trace else []) + \
           (["--offload-mlp-layers", str(offload_mlp)] if offload_mlp and "--offload-mlp-layers" not in extra else []) + list(extra)
    name = "lorakit" + ("-plain" if plain else "") + ("-exact" if kernels == "exact" else "") + \
           (f"-keep{keep_gib:g}" if keep_gib is not None and not main else "") + ("-nograph" if graph == "off" else "") + ("-embgpu" if embeddings == "off" else "") + (f"-{label}" if label else "")
    torch.cuda.synchronize()
    with DevicePeak() as dev:
        r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        return dict(system=name, error=r.stderr[-600:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    res = dict(system=name, tokens_per_s=out["tokens_per_s"], step_s=out["step_s"],
               loss=out["loss_step1"], peak_mem_gib=out.get("peak_alloc_gib") or float("nan"), device_mem_gib=dev.gib)
    res["peak_reserved_gib"] = out.get("peak_reserved_gib")
    res["cuda_graph"] = out.get("cuda_graph")
    res["embeddings_on_host"] = out.get("embeddings_on_host")
    res["offload_checkpoints"] = out.get("offload_checkpoints")
    if keep_gib is not None:
        res["checkpoint_keep_gib"] = keep_gib
        res["offload_mlp_layers"] = offload_mlp
    for key in ("quantize", "model_gib", "load_s"):
        if out.get(key) is not None:
            res[key] = out[key]
    for key in ("phases_ms", "memory_trace"):
        if out.get(key):
            res[key] = out[key]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--plain", action="store_true", help="also time LoraKit's unoptimised full-logits loss")
    ap.add_argument("--exact", action="store_true", help="also time LoraKit with --kernels exact (PEFT's fp32 LoRA branch)")
    ap.add_argument("--profile", action="store_true", help="LoraKit also reports per-phase times (forward, backward, optimizer)")
    ap.add_argument("--hf-profile", action="store_true", help="print torch.profiler's top CUDA kernels for HF's step")
    ap.add_argument("--no-hf", action="store_true", help="LoraKit only (quick iterations; ratios need HF in the same call)")
    ap.add_argument("--keep-sweep", nargs="*", type=float, default=[],
                    help="checkpointed workloads: also time LoraKit with these --checkpoint-keep-gib values")
    ap.add_argument("--keep", type=float, default=8.5,
                    help="checkpointed workloads: LoraKit's --checkpoint-keep-gib (its default is 2). With checkpoints and the gate/up "
                         "of --offload-mlp-layers layers in host memory, 8.5 keeps every layer's gate/up and q/k/v, so the replay "
                         "recomputes no projection, and llama-8b's allocated peak stays under HF's (the issue's limit for these workloads)")
    ap.add_argument("--offload-mlp-layers", type=int, default=None,
                    help="checkpointed workloads: LoraKit's --offload-mlp-layers (gate/up of every third layer from the first go to "
                         "host memory). Default: 10 on llama-8b, 0 on llama-1b, whose layers compute too little for the PCIe link to "
                         "carry gate/up beside the checkpoints (bench/NOTES.md)")
    ap.add_argument("--embeddings-ab", action="store_true",
                    help="checkpointed workloads: also time LoraKit with --embeddings-on-host off (the table on the GPU)")
    ap.add_argument("--no-graph", action="store_true", help="also time LoraKit without the CUDA graph (--cuda-graph off)")
    ap.add_argument("--memory-trace", action="store_true", help="LoraKit's main run also reports the allocated bytes between a step's phases")
    ap.add_argument("--variant", nargs="*", default=[], metavar="NAME=ARGS",
                    help="also time LoraKit with these extra `lorakit bench` arguments (A/B experiments), e.g. chunk64='--loss-chunk-mib 64'")
    ap.add_argument("--old-app", default=None, metavar="TGZ",
                    help="also time another LoraKit build (its managed assemblies in TGZ, laid over the packed app), "
                         "run before and after the main LoraKit row: label 'old'")
    ap.add_argument("--out", default="bench/results/latest.json")
    a = ap.parse_args()
    torch.cuda.init()
    old = old_app_launcher(a.old_app) if a.old_app else None
    rows = []
    for shape, b, s, ckpt in WORKLOADS:
        if a.only and shape not in a.only:
            continue
        name = f"{shape} {b}x{s}" + (" ckpt" if ckpt else "")
        mlp = a.offload_mlp_layers if a.offload_mlp_layers is not None else OFFLOAD_MLP.get(shape, 0)
        d, ids, ids_path = prepare_batch(shape, b, s)
        runs = [] if a.no_hf else [lambda: hf_run(d, ids, ckpt, a.steps, a.warmup, a.hf_profile)]
        runs.append(lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, profile=a.profile, keep_gib=a.keep if ckpt else None, main=True,
                                       memory_trace=a.memory_trace, offload_mlp=mlp if ckpt else 0))
        if old:
            # old, new, old, new: a drift of the machine over the call shows as a difference between the two old rows
            runs.insert(len(runs) - 1, lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, keep_gib=a.keep if ckpt else None, main=True,
                                                           offload_mlp=mlp if ckpt else 0, label="old", launcher=old))
            runs.append(lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, keep_gib=a.keep if ckpt else None, main=True,
                                            offload_mlp=mlp if ckpt else 0, label="old", launcher=old))
            runs.append(lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, keep_gib=a.keep if ckpt else None, main=True,
                                            offload_mlp=mlp if ckpt else 0))
        for v in a.variant:
            label, _, args = v.partition("=")
            runs.append(lambda label=label, args=args: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, keep_gib=a.keep if ckpt else None,
                                                                   main=True, extra=args.split(), label=label,
                                                                   offload_mlp=mlp if ckpt else 0))
        for k in a.keep_sweep if ckpt else []:
            runs.append(lambda k=k: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, keep_gib=k, offload_mlp=mlp))
        if a.embeddings_ab and ckpt:
            runs.append(lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, keep_gib=a.keep, embeddings="off"))
        if a.no_graph:
            runs.append(lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, graph="off"))
        if a.exact:
            runs.append(lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, kernels="exact"))
        if a.plain:
            runs.append(lambda: lorakit_run(d, ids_path, ckpt, a.steps, a.warmup, plain=True))
        for run in runs:
            res = run()
            res["workload"] = name
            rows.append(res)
            print(json.dumps(res), flush=True)
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)  # after every row: a cut-off run keeps what it measured
            json.dump({"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "rows": rows}, open(a.out, "w"), indent=1)
    print_table(rows)


def print_table(rows):
    print(f"\n{'workload':24} {'system':14} {'tok/s':>8} {'x HF':>6} {'alloc GiB':>9} {'x HF':>6} {'device GiB':>10} {'x HF dev':>8} {'step-1 loss':>11}")
    hf = {r["workload"]: r for r in rows if r["system"] == "hf-peft"}
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:24} {r['system']:14} ERROR {r['error'][-200:]}")
            continue
        base = hf.get(r["workload"], r)
        print(f"{r['workload']:24} {r['system']:14} {r['tokens_per_s']:>8} {r['tokens_per_s'] / base['tokens_per_s']:>6.2f} "
              f"{r['peak_mem_gib']:>9.2f} {r['peak_mem_gib'] / max(base['peak_mem_gib'], 1e-9):>6.2f} {r['device_mem_gib']:>10.2f} "
              f"{r['device_mem_gib'] / max(base['device_mem_gib'], 1e-9):>8.2f} {r['loss']:>11.4f}")
    print(f"GPU: {torch.cuda.get_device_name(0)}")


if __name__ == "__main__":
    main()
