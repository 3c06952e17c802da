"""GPU check: `lorakit train` with the CUDA graph step against the same run without it.

A packed run (batches share one shape, so the step is captured once and replayed) with gradient accumulation,
validation and checkpoints between replays: the logged losses, the validation losses and the saved adapter must match
the eager run's (the replay runs the same kernels; check-kernels shows it bitwise equal on a single step).
usage (GPU machine, after bench/pack.sh): python3 bench/check_train_graph.py [--model fixtures/models/llama]
"""
import argparse, json, os, random, subprocess, sys
import torch
from safetensors.torch import load_file


def train(model, data, out, graph):
    args = ["bash", ".gpu/on-gpu.sh", "LoraKit.Cli", "train", "--model", model, "--data", data, "--output", out,
            "--packing", "--max-length", "96", "--batch-size", "4", "--grad-accum", "2", "--steps", "24", "--lr", "1e-3",
            "--lora-dropout", "0", "--validation-fraction", "0.1", "--eval-every", "8", "--save-every", "8",
            "--device", "cuda", "--cuda-graph", graph, "--seed", "3"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"train --cuda-graph {graph} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    notes = [l for l in (r.stdout + r.stderr).splitlines() if "CUDA graph" in l]
    return lines, notes, load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fixtures/models/llama")
    ap.add_argument("--work", default="/tmp/lorakit-graph-check")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    rng = random.Random(0)
    words = "the a cat dog sat on mat ran far and home blue red green fish tree sky".split()
    data = os.path.join(a.work, "data.jsonl")
    with open(data, "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))}) + "\n")
    runs = {}
    for graph in ("on", "off"):
        out = os.path.join(a.work, graph)
        subprocess.run(["rm", "-rf", out])
        runs[graph] = train(a.model, data, out, graph)
    (m_on, notes, ad_on), (m_off, _, ad_off) = runs["on"], runs["off"]
    print("\n".join(notes))
    key = lambda m: [(l.get("step"), l.get("loss"), l.get("eval_loss")) for l in m]
    worst = 0.0
    for x, y in zip(key(m_on), key(m_off)):
        for u, v in zip(x[1:], y[1:]):
            if u is not None and v is not None:
                worst = max(worst, abs(u - v) / max(abs(v), 1e-12))
    adapter = max(((ad_on[k].float() - ad_off[k].float()).norm() / ad_off[k].float().norm()).item() for k in ad_off)
    print(f"logged lines: {len(m_on)} vs {len(m_off)}; worst loss difference (relative) {worst:.2e}; adapter (rel L2, worst tensor) {adapter:.2e}")
    replayed = [int(n.split("CUDA graph: ")[1].split()[0]) for n in notes if "micro-batches replayed" in n]
    ok = len(m_on) == len(m_off) and worst <= 1e-3 and adapter <= 1e-2 and replayed and replayed[0] > 0 and not any("CUDA graph off for this run" in n for n in notes)
    print("train with CUDA graph matches eager" if ok else "train with CUDA graph DIFFERS")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
