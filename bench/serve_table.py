"""The serving benchmark's table (issue 21) from the JSON lines of `lorakit bench-serve`, bench/hf_serve_peer.py and the
copy-rate probe of bench/run_serve_bench.sh.

    python3 bench/serve_table.py [--gpu NAME] [--copy-gbps R] [--out bench/results/serve.json] [--markdown FILE] < raw.jsonl
reads every line of stdin that is a JSON object:
  - rows: a "system" key ("lorakit", "hf-eager", "hf-static-compiled", "hf-peft-eager"), "load" (A, B128, B512),
    "adapters", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", ... or "error" / "skipped".
    Missing keys are filled where they can be (an older bench-serve line: system "lorakit", new_tokens from
    generated_tokens / requests, load from requests and prompt tokens). A row repeated (same system, load, batch,
    adapters) counts once, the last one;
  - the probe: {"probe": "copy", "copy_gbps": bytes read + written per second, "gpu": ...}: the copy rate and GPU name
    unless --copy-gbps / --gpu give them;
  - anything else (the HF peer's "info" line) is ignored.
Prints a markdown table per load (LoraKit base / 1 / 8 / 32 / 1,000 adapters, HF eager, static + compiled, PEFT; the
weight-read floor), then the issue's targets, each met or not; writes --out as {"date", "gpu", "copy_gbps", "rows",
"floor", "targets"}.

    python3 bench/serve_table.py --annotate system=lorakit load=A [--rc N] [--stderr FILE] < stdout-of-one-run
is the runner's helper: the last JSON line of stdin with the given keys filled in where absent, or, when there is none
(a crash, a timeout), an error row made of those keys, the exit code and the tail of the stderr file (unless the keys
hold "skipped": then just those keys). One line out.
"""
import argparse
import json
import sys
import time

LOAD_ORDER = ["A", "B128", "B512"]
# (requests, prompt tokens) -> load, for rows that do not say
LOAD_OF_SHAPE = {(64, 128): "A", (256, 128): "B128", (256, 512): "B512"}
WEIGHT_GB = 2.47  # bf16 weights of the Llama-3.2-1B shape read per decode step (the tied table once, as the LM head)
BATCH = 32
TARGET_BASE_TPS = 15000
TARGET_X_COMPILED = 2.0
TARGET_FLOOR_SHARE = 0.55
TARGET_MIXED32 = 0.9
TARGET_1000 = 0.6
TARGET_TTFT_P99_MS = 300


def json_lines(stream):
    out = []
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def normalize(r):
    r = dict(r)
    r.setdefault("system", "lorakit")
    if "new_tokens" not in r and r.get("generated_tokens") and r.get("requests"):
        r["new_tokens"] = round(r["generated_tokens"] / r["requests"])
    if "load" not in r:
        r["load"] = LOAD_OF_SHAPE.get((r.get("requests"), r.get("prompt_tokens")), f"{r.get('requests')}x{r.get('prompt_tokens')}")
    if "batch" not in r:
        r["batch"] = r.get("max_batch") or BATCH
    r["adapters"] = int(r.get("adapters") or 0)
    return r


def key(r):
    return (r["system"], r["load"], r["batch"], r["adapters"])


def dedupe(rows):
    last = {}
    for r in rows:
        last[key(r)] = r
    return list(last.values())


def ok(r):
    return r is not None and "error" not in r and "skipped" not in r and r.get("tokens_per_s")


def find(rows, system, load, adapters=0, batch=None):
    hits = [r for r in rows if r["system"] == system and r["load"] == load and r["adapters"] == adapters
            and (batch is None or r["batch"] == batch)]
    good = [r for r in hits if ok(r)]
    return (good or hits or [None])[0]


def system_rank(r):
    order = {"lorakit": 0, "hf-eager": 1, "hf-static-compiled": 2, "hf-peft-eager": 3}
    return (order.get(r["system"], 9), r["adapters"], r["batch"])


def label(r):
    s, k, b = r["system"], r["adapters"], r["batch"]
    if s == "lorakit":
        return "LoraKit, base model" if k == 0 else "LoraKit, 1 adapter" if k == 1 else \
            f"LoraKit, {k} adapters (mixed batches)" if k <= 32 else f"LoraKit, {k:,} adapters (uniform traffic)"
    if s == "hf-eager":
        return f"HF `generate`, eager, batch {b}"
    if s == "hf-static-compiled":
        return f"HF `generate`, static cache + torch.compile, batch {b}"
    if s == "hf-peft-eager":
        return f"HF + PEFT, 1 adapter, eager, batch {b}" if k == 1 else \
            f"HF + PEFT, {k} adapters mixed (`adapter_names`), eager, batch {b}"
    return f"{s}, {k} adapters, batch {b}"


def own_base(rows, r):
    """The row an adapter row is compared with: LoraKit's base on that load, or, for PEFT, HF eager at its batch."""
    if r["system"] == "lorakit" and r["adapters"] > 0:
        return find(rows, "lorakit", r["load"], 0)
    if r["system"] == "hf-peft-eager":
        return find(rows, "hf-eager", r["load"], 0, r["batch"])
    return None


def ratio(a, b):
    return a["tokens_per_s"] / b["tokens_per_s"] if ok(a) and ok(b) else None


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}"


def fmt_ms(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def pair(r, a, b):
    return f"{fmt_ms(r.get(a))} / {fmt_ms(r.get(b))}"


def load_title(rows):
    r = next((x for x in rows if x.get("requests")), rows[0])
    return (f"Load {r['load']}: {r.get('requests', '?')} requests, {r.get('prompt_tokens', '?')} prompt + "
            f"{r.get('new_tokens', '?')} new tokens, batch limit {r.get('batch', BATCH)}")


def floor_tps(copy_gbps, weight_gb, batch=BATCH):
    """Decode tokens/s if a step took only the time to read the weights once at the copy rate."""
    return batch / (weight_gb / copy_gbps) if copy_gbps else None


def table(rows, copy_gbps, weight_gb):
    lines = []
    loads = sorted({r["load"] for r in rows}, key=lambda x: (LOAD_ORDER.index(x) if x in LOAD_ORDER else 9, x))
    for load in loads:
        here = sorted([r for r in rows if r["load"] == load], key=system_rank)
        compiled = find(rows, "hf-static-compiled", load, 0, BATCH) or find(rows, "hf-static-compiled", load, 0)
        lines += ["", f"### {load_title(here)}", "",
                  "| system | tokens/s | × HF static+compiled | × base | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in here:
            if not ok(r):
                why = r.get("error") or r.get("skipped") or "no tokens/s"
                lines.append(f"| {label(r)} | {'skipped' if 'skipped' in r else 'error'}: {str(why)[:120].replace('|', '/')} | | | | |")
                continue
            base = own_base(rows, r)
            lines.append(f"| {label(r)} | {r['tokens_per_s']:,.0f} | {fmt_ratio(ratio(r, compiled))} | "
                         f"{fmt_ratio(ratio(r, base)) if base is not None else ''} | "
                         f"{pair(r, 'ttft_p50_ms', 'ttft_p99_ms')} | {pair(r, 'tpot_p50_ms', 'tpot_p99_ms')} |")
        f = floor_tps(copy_gbps, weight_gb)
        if f:
            lines.append(f"| weight-read floor at batch {BATCH} ({weight_gb:g} GB of weights per step at the measured "
                         f"{copy_gbps / 1000:.2f} TB/s copy rate) | ~{round(f, -2):,.0f} | | | | |")
    lines += ["", "× base: LoraKit adapter rows against LoraKit's base model on the same load; HF + PEFT rows against "
                  "HF eager at the same batch. TTFT/TPOT: bench/NOTES.md (serving benchmark)."]
    return lines


def target(name, measured, met):
    return dict(target=name, measured=measured, met=met)


def targets(rows, copy_gbps, weight_gb):
    out = []
    base = find(rows, "lorakit", "A", 0)
    compiled = find(rows, "hf-static-compiled", "A", 0, BATCH)
    b = base["tokens_per_s"] if ok(base) else None
    out.append(target(f"base model, {BATCH} concurrent (load A): ≥ {TARGET_BASE_TPS:,} tok/s",
                      f"{b:,.0f} tok/s" if b else "not measured", b >= TARGET_BASE_TPS if b else None))
    x = ratio(base, compiled)
    out.append(target(f"base model ≥ {TARGET_X_COMPILED:g}× HF static+compiled (load A)",
                      f"{x:.2f}×" if x else "not measured", x >= TARGET_X_COMPILED if x else None))
    f = floor_tps(copy_gbps, weight_gb)
    if b and f:
        # The issue's ~26,800 at 4.1 TB/s counted a copy's bytes once (half the read + write rate the probe reports);
        # its 55% target was set against that figure, so it is judged against it here.
        issue_floor = f / 2
        out.append(target(f"base model ≥ {TARGET_FLOOR_SHARE:.0%} of the weight-read floor as the issue computes it "
                          f"(copy rate / 2: ~{issue_floor:,.0f} tok/s)",
                          f"{b / issue_floor:.0%} ({b / f:.0%} of the floor at the full copy rate)", b >= TARGET_FLOOR_SHARE * issue_floor))
    else:
        out.append(target(f"base model ≥ {TARGET_FLOOR_SHARE:.0%} of the weight-read floor", "not measured", None))
    for load in LOAD_ORDER:
        base_l = find(rows, "lorakit", load, 0)
        for k, bar in ((32, TARGET_MIXED32), (1000, TARGET_1000)):
            r = find(rows, "lorakit", load, k)
            if r is None:
                continue
            x = ratio(r, base_l)
            out.append(target(f"{k:,} {'mixed ' if k == 32 else ''}adapters ≥ {bar:g}× base (load {load})",
                              f"{x:.2f}×" if x else "not measured", x >= bar if x else None))
    a_rows = [r for r in rows if r["system"] == "lorakit" and r["load"] == "A" and ok(r) and r.get("ttft_p99_ms") is not None]
    if a_rows:
        worst = max(a_rows, key=lambda r: r["ttft_p99_ms"])
        b_ttft = next((r["ttft_p99_ms"] for r in a_rows if r["adapters"] == 0), None)
        out.append(target(f"p99 TTFT ≤ {TARGET_TTFT_P99_MS} ms under the 64-request load (load A, every LoraKit row)",
                          f"base {fmt_ms(b_ttft)} ms; worst {fmt_ms(worst['ttft_p99_ms'])} ms ({worst['adapters']:,} adapters)",
                          worst["ttft_p99_ms"] <= TARGET_TTFT_P99_MS))
    else:
        out.append(target(f"p99 TTFT ≤ {TARGET_TTFT_P99_MS} ms under the 64-request load", "not measured", None))
    return out


def target_lines(ts):
    mark = {True: "met", False: "**not met**", None: "not measured"}
    return ["", "| target | measured | |", "|---|---|---|"] + [f"| {t['target']} | {t['measured']} | {mark[t['met']]} |" for t in ts]


def annotate(a):
    fields = {}
    for kv in a.annotate:
        k, _, v = kv.partition("=")
        try:
            fields[k] = json.loads(v)  # numbers stay numbers
        except json.JSONDecodeError:
            fields[k] = v
    got = json_lines(sys.stdin)
    if got:
        r = got[-1]
        for k, v in fields.items():
            r.setdefault(k, v)
    elif "skipped" in fields:
        r = fields
    else:
        tail = ""
        if a.stderr:
            try:
                tail = " ".join(open(a.stderr, errors="replace").read().strip().splitlines()[-3:])
            except OSError:
                pass
        why = "timed out" if a.rc in (124, 137) else f"exit {a.rc}" if a.rc else "no JSON line"
        r = dict(fields, error=f"{why}: {tail}"[:600])
    print(json.dumps(r))


def main():
    ap = argparse.ArgumentParser(description="serving benchmark table (issue 21)")
    ap.add_argument("--gpu", help="GPU name for serve.json (default: the probe line's)")
    ap.add_argument("--copy-gbps", type=float, help="device copy rate, GB/s of bytes read + written (default: the probe line's)")
    ap.add_argument("--weight-gb", type=float, default=WEIGHT_GB, help=f"weights read per decode step, GB (default {WEIGHT_GB})")
    ap.add_argument("--out", default="bench/results/serve.json", help="where to write the rows, floor and targets ('' = nowhere)")
    ap.add_argument("--markdown", help="also write the printed table to this file")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--annotate", nargs="+", metavar="KEY=VALUE", help="runner helper mode (see the module doc)")
    ap.add_argument("--rc", type=int, default=0, help="with --annotate: the run's exit code")
    ap.add_argument("--stderr", help="with --annotate: the run's stderr file")
    a = ap.parse_args()
    if a.annotate:
        annotate(a)
        return
    lines = json_lines(sys.stdin)
    probe = next((x for x in reversed(lines) if x.get("probe") == "copy"), {})
    copy_gbps = a.copy_gbps or probe.get("copy_gbps")
    gpu = a.gpu or probe.get("gpu") or "unknown GPU"
    # a row has a system, or is an older bench-serve line (adapters and tokens/s, no system)
    rows = dedupe([normalize(x) for x in lines if "system" in x or ("adapters" in x and "tokens_per_s" in x)])
    if not rows:
        sys.exit("serve_table: no rows (JSON lines with a \"system\" key) on stdin")
    ts = targets(rows, copy_gbps, a.weight_gb)
    text = [f"## Serving benchmark, {gpu}, {a.date}"] + table(rows, copy_gbps, a.weight_gb) + target_lines(ts)
    print("\n".join(text))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(text) + "\n")
    if a.out:
        f = floor_tps(copy_gbps, a.weight_gb)
        with open(a.out, "w") as fh:
            json.dump(dict(date=a.date, gpu=gpu, copy_gbps=copy_gbps, weight_gb=a.weight_gb,
                           floor=dict(batch=BATCH, tokens_per_s=round(f) if f else None), rows=rows, targets=ts), fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
