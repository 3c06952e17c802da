"""Summarises an `ncu --csv --metrics gpu__time_duration.sum` log: total GPU time, time by kind of kernel, top kernels."""
import csv
import re
import sys
from collections import defaultdict

UNIT = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3, "ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
KINDS = [("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|ampere_|cublas"), ("attention", r"flash|sdpa|fmha|attention"),
         ("softmax/loss", r"softmax|nll|cross_entropy|log_softmax"), ("reduce", r"reduce|norm"),
         ("copy/cat/index", r"copy|cat|index|gather|scatter|direct_copy|CatArray|fill"), ("elementwise", r"elementwise")]


def kind(name):
    for k, pat in KINDS:
        if re.search(pat, name, re.I):
            return k
    return "other"


def main(path):
    lines = open(path).read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = [r for r in csv.DictReader(lines[start:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
    total, by_kind, by_name, count = 0.0, defaultdict(float), defaultdict(float), defaultdict(int)
    for r in rows:
        ms = float(r["Metric Value"].replace(",", "")) * UNIT[r["Metric Unit"]]
        name = r["Kernel Name"]
        total += ms
        by_kind[kind(name)] += ms
        by_name[name[:110]] += ms
        count[name[:110]] += 1
    print(f"{len(rows)} kernels, {total:.1f} ms GPU time in the profiled step")
    print(f"{'kind':18} {'ms':>8} {'share':>6}")
    for k, v in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"{k:18} {v:8.1f} {v / total:6.1%}")
    print(f"\n{'ms':>8} {'calls':>6}  kernel")
    for n, v in sorted(by_name.items(), key=lambda x: -x[1])[:30]:
        print(f"{v:8.2f} {count[n]:6}  {n}")


if __name__ == "__main__":
    main(sys.argv[1])
