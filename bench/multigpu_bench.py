"""Helpers of bench/run_multigpu_bench.sh (issue 23): data, tokens/s from a run's metrics, the trajectory comparison,
the table. Python 3's standard library only.

  multigpu_bench.py data OUT.jsonl [--lines N] [--words W]     seeded random-word text (rows truncate to --max-length)
  multigpu_bench.py rate RUN_DIR --gpus N --warmup K           one scaling row (JSON) from RUN_DIR/metrics.jsonl
  multigpu_bench.py trajectory DP_DIR ONE_DIR --gpus N         losses per step and adapter difference, pass/fail
  multigpu_bench.py table RAW.jsonl OUT_DIR                    multigpu.json + multigpu.md from the rows
"""
import json
import math
import os
import random
import sys

WORDS = ("the of and to in is was for on that with as by at from it an be this are or his which had not but have they "
         "one all were her can their there been has more if will would who so what when up out no about into than them "
         "some could time only new other may these two first then do any like my now over such our man me even most made "
         "after also did many before must through back years where much your way well down should because each just "
         "those people how too little state good very make world still own see men work long get here between both life "
         "being under never day same another know while last might us great old year off come since against go came right "
         "used take three").split()


def data(path, lines=1024, words=2600):
    rng = random.Random(1234)
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def steps(run_dir):
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            o = json.loads(line)
            if "loss" in o and "tokens" in o:
                rows.append(o)
    return rows


def rate(run_dir, gpus, warmup):
    s = steps(run_dir)
    if len(s) <= warmup + 1:
        return dict(gpus=gpus, error=f"only {len(s)} steps logged")
    a, b = s[warmup - 1] if warmup > 0 else dict(tokens=0, elapsed_s=0.0), s[-1]
    tps = (b["tokens"] - a["tokens"]) / max(b["elapsed_s"] - a["elapsed_s"], 1e-9)
    return dict(gpus=gpus, tokens_per_s=round(tps, 1), timed_steps=len(s) - warmup,
                step_s=round((b["elapsed_s"] - a["elapsed_s"]) / (len(s) - warmup), 4),
                tokens_per_step=(b["tokens"] - a["tokens"]) // (len(s) - warmup), final_loss=s[-1]["loss"])


def load_file(path):
    """A safetensors file's tensors as flat lists of floats (F32, BF16, F16), with no dependency beyond the standard library."""
    import array
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        raw = body[a:b]
        if v["dtype"] == "F32":
            vals = array.array("f", raw)
        elif v["dtype"] == "BF16":
            vals = array.array("f", struct.pack(f"<{len(raw) // 2}I", *(x << 16 for x in struct.unpack(f"<{len(raw) // 2}H", raw))))
        elif v["dtype"] == "F16":
            vals = struct.unpack(f"<{len(raw) // 2}e", raw)
        else:
            raise ValueError(f"{path}: {k} is {v['dtype']}")
        out[k] = list(vals)
    return out


def trajectory(dp_dir, one_dir, gpus, loss_tol=1e-2, adapter_tol=5e-2):
    dp, one = steps(dp_dir), steps(one_dir)
    losses = [dict(step=x["step"], ranks=x["loss"], one=y["loss"], rel=abs(x["loss"] - y["loss"]) / abs(y["loss"])) for x, y in zip(dp, one)]
    a = load_file(os.path.join(dp_dir, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(one_dir, "adapter", "adapter_model.safetensors"))
    num = sum((x - y) ** 2 for k in b for x, y in zip(a[k], b[k]))
    den = sum(y * y for k in b for y in b[k])
    adapter_rel = math.sqrt(num / max(den, 1e-30))
    ok = len(dp) == len(one) > 0 and all(r["rel"] <= loss_tol for r in losses) and adapter_rel <= adapter_tol and set(a) == set(b)
    return dict(check="trajectory", gpus=gpus, losses=losses, max_loss_rel=max((r["rel"] for r in losses), default=float("nan")),
                adapter_rel_l2=adapter_rel, loss_tol=loss_tol, adapter_tol=adapter_tol, passed=ok)


def table(raw, out_dir):
    rows = [json.loads(l) for l in open(raw) if l.strip()]
    scale = {}
    for r in rows:
        if r.get("check") == "scale" and "tokens_per_s" in r:
            scale[r["gpus"]] = r  # the latest row per GPU count
    base = scale.get(1, {}).get("tokens_per_s")
    for n, r in scale.items():
        r["efficiency"] = round(r["tokens_per_s"] / (n * base), 3) if base else None
    targets = {2: 0.95, 8: 0.9}
    result = dict(scale=[scale[n] for n in sorted(scale)], checks=[r for r in rows if r.get("check") in ("trajectory", "kill", "watchdog")],
                  errors=[r for r in rows if "error" in r], targets=targets)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "multigpu.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = ["| GPUs | tokens/s | step (s) | tokens/step | scaling efficiency | target |", "|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(scale):
        r = scale[n]
        eff = "" if r.get("efficiency") is None else f"{r['efficiency']:.3f}"
        md.append(f"| {n} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['tokens_per_step']:,} | {eff} | {targets.get(n, '')} |")
    for c in result["checks"]:
        if c["check"] == "trajectory":
            md.append(f"\nTrajectory, {c['gpus']} GPUs × batch b vs 1 GPU × batch {c['gpus']}·b: max loss difference {c['max_loss_rel']:.2e} "
                      f"(tolerance {c['loss_tol']}), adapter relative L2 {c['adapter_rel_l2']:.2e} (tolerance {c['adapter_tol']}): "
                      f"{'PASS' if c['passed'] else 'FAIL'}")
        else:
            md.append(f"\n{c['check']}: {json.dumps({k: v for k, v in c.items() if k != 'check'})}")
    for e in result["errors"]:
        md.append(f"\nerror: {json.dumps(e)}")
    text = "\n".join(md) + "\n"
    with open(os.path.join(out_dir, "multigpu.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]

    def opt(name, default):
        return type(default)(args[args.index(name) + 1]) if name in args else default

    if cmd == "data":
        data(args[0], opt("--lines", 1024), opt("--words", 2600))
    elif cmd == "rate":
        print(json.dumps(dict(check="scale", **rate(args[0], opt("--gpus", 1), opt("--warmup", 3)))))
    elif cmd == "trajectory":
        print(json.dumps(trajectory(args[0], args[1], opt("--gpus", 2))))
    elif cmd == "table":
        table(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd}")
