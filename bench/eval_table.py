"""The evaluation benchmark's table and agreement check (bench/run_eval_bench.sh runs it).

    python3 bench/eval_table.py WORKDIR [OUT.json]

WORKDIR holds manifest.json (make_eval_bench.py), lorakit.json (`lorakit eval --json`), hf.json (eval_peer.py's last
line), hf-cases.json (its --cases-out) and walls.json (the shell's wall-clock seconds around each process:
lorakit, lorakit_startup — the same command on a one-case suite without adapters, i.e. start, CUDA and model load —
and hf). Prints per system: cases × models, process wall s, eval s (LoraKit: wall minus the one-case run's wall; HF:
its own timers around adapters, generation and scoring), ms per case-model, generated tokens/s over eval s, and
HF's time over LoraKit's. Then how far the two agree, greedy on a random bf16 model (near-ties flip under different
kernels, so high but not 100% is expected): generated outputs equal, verdicts equal (HF's outputs checked by a
Python copy of LoraKit's checks, which must reproduce LoraKit's own verdicts on LoraKit's outputs), choice picks,
and the largest relative difference of per-text mean NLL and of each model's perplexity.
LoraKit's report has no token counts: its generated tokens are HF's count for the case when both outputs are equal,
else the case's max_tokens (a random model seldom draws an EOS id); a "generated_tokens" field in the report's
outcomes, if LoraKit adds one, is used instead.
"""
import json
import math
import os
import re
import sys

# ---- LoraKit's checks (src/LoraKit/Evaluation/Expectation.cs), in Python ----

# char.IsWhiteSpace: the Unicode White_Space characters, which .NET's Trim removes (Python's strip also removes \x1c-\x1f).
DOTNET_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200b)) + "\u2028\u2029\u202f\u205f\u3000"


def trim(s):
    return s.strip(DOTNET_WS)


def upper_simple(s):
    """OrdinalIgnoreCase compares simple (one-to-one) uppercase mappings."""
    return "".join(u if len(u := ch.upper()) == 1 else ch for ch in s)


def no_constants(x):
    raise ValueError(x)


def is_json(output):
    s = trim(output)
    if s.startswith("```"):
        nl = s.find("\n")
        s = "" if nl < 0 else s[nl + 1:]
        if s.rstrip(DOTNET_WS).endswith("```"):
            s = s.rstrip(DOTNET_WS)[:-3]
    try:
        json.loads(s, parse_constant=no_constants)  # System.Text.Json refuses NaN and Infinity
        return True
    except (ValueError, RecursionError):
        return False


def passes(expect, output):
    """The verdict of a generated case's expectation on an output (choices are compared by pick)."""
    if "equals" in expect:
        return trim(output) == trim(expect["equals"])
    if "contains" in expect:
        v = expect["contains"]
        return all(x in output for x in ([v] if isinstance(v, str) else v))
    if "not_contains" in expect:
        up = upper_simple(output)
        return not any(upper_simple(x) in up for x in expect["not_contains"])
    if "regex" in expect:
        return re.search(expect["regex"], output) is not None
    if "json" in expect:
        return is_json(output)
    raise ValueError(f"no check for {expect}")


# ---- reading both systems' outcomes ----

def lorakit_outcomes(report, models):
    """{model: {id: outcome}} from the report's cases (adapters in --adapter order)."""
    out = {m: {} for m in models}
    for c in report["cases"]:
        out[models[0]][c["id"]] = c["base"]
        for m, o in zip(models[1:], c["adapters"]):
            out[m][c["id"]] = o
    return out


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def compare(suite, lk, hf, models):
    """Agreement counts over every case and model, and LoraKit's generated-token estimate."""
    n = dict(gen=0, same_output=0, verdicts=0, same_verdict=0, py_reproduces=0, choices=0, same_pick=0, ppl=0)
    max_nll, lk_tokens, ppl = 0.0, 0, {}
    for m in models:
        ll = {"lk": [0.0, 0], "hf": [0.0, 0]}
        for c in suite:
            a, b = lk[m][c["id"]], hf[m][c["id"]]
            if "text" in c:
                n["ppl"] += 1
                max_nll = max(max_nll, rel(a["mean_nll"], b["mean_nll"]))
                for key, o in (("lk", a), ("hf", b)):
                    ll[key][0] += o["mean_nll"] * o["tokens"]
                    ll[key][1] += o["tokens"]
            elif "choices" in c["expect"]:
                n["choices"] += 1
                n["verdicts"] += 1
                n["same_pick"] += a["output"] == b["output"]
                hf_pass = c["expect"]["choices"].index(b["output"]) == c["expect"]["answer"]
                n["same_verdict"] += (a["status"] == "passed") == hf_pass
            else:
                n["gen"] += 1
                n["verdicts"] += 1
                same = a["output"] == b["output"]
                n["same_output"] += same
                lk_pass = a["status"] == "passed"
                n["py_reproduces"] += passes(c["expect"], a["output"]) == lk_pass
                n["same_verdict"] += passes(c["expect"], b["output"]) == lk_pass
                lk_tokens += a.get("generated_tokens") or (b["tokens"] if same else c.get("max_tokens", 64))
        ppl[m] = {k: math.exp(v[0] / v[1]) if v[1] else None for k, v in ll.items()}
    ppl_rel = max((rel(p["lk"], p["hf"]) for p in ppl.values() if p["lk"]), default=0.0)
    agreement = dict(
        generated_outputs_equal=frac(n["same_output"], n["gen"]), verdicts_equal=frac(n["same_verdict"], n["verdicts"]),
        python_checks_reproduce_lorakit=f"{n['py_reproduces']}/{n['gen']}", choice_picks_equal=frac(n["same_pick"], n["choices"]),
        max_rel_diff_mean_nll=round(max_nll, 5), max_rel_diff_perplexity=round(ppl_rel, 5),
        perplexity={m: {k: round(v, 4) if v else v for k, v in p.items()} for m, p in ppl.items()}, counts=n)
    return agreement, lk_tokens


def frac(a, b):
    return round(a / b, 4) if b else None


def main():
    work = sys.argv[1]
    out_path = sys.argv[2] if len(sys.argv) > 2 else "bench/results/eval.json"
    load = lambda f: json.load(open(os.path.join(work, f)))  # noqa: E731
    manifest, report, walls = load("manifest.json"), load("lorakit.json"), load("walls.json")
    hf, hf_cases = load("hf.json"), load("hf-cases.json")
    suite = [json.loads(line) for line in open(manifest["suite"]) if line.strip()]
    models = hf_cases["models"]
    assert len(report["adapters"]) == len(models) - 1, "LoraKit and HF evaluated different adapters"
    lk = lorakit_outcomes(report, models)
    agreement, lk_tokens = compare(suite, lk, hf_cases["results"], models)

    cm = len(suite) * len(models)
    lk_eval = walls["lorakit"] - walls.get("lorakit_startup", 0.0)
    rows = [
        dict(system="lorakit", case_models=cm, wall_s=round(walls["lorakit"], 2), eval_s=round(lk_eval, 2),
             startup_s=round(walls.get("lorakit_startup", 0.0), 2), generated_tokens=lk_tokens,
             generated_tokens_estimated=not any("generated_tokens" in o for o in lk[models[0]].values())),
        dict(system=hf["system"], case_models=cm, wall_s=round(walls["hf"], 2), eval_s=hf["eval_s"],
             startup_s=round(hf["import_s"] + hf["load_s"], 2), generated_tokens=hf["generated_tokens"],
             hf_gen_tokens_per_s=hf["gen_tokens_per_s"], per_model=hf["per_model"]),
    ]
    if os.path.exists(os.path.join(work, "hf-compile.json")):  # HF_COMPILE=1: the peer again, static cache and compiled decoding
        c = load("hf-compile.json")
        rows.append(dict(system=c["system"], case_models=cm, wall_s=round(c["total_s"], 2), eval_s=c["eval_s"],
                         startup_s=round(c["import_s"] + c["load_s"], 2), generated_tokens=c["generated_tokens"],
                         hf_gen_tokens_per_s=c["gen_tokens_per_s"], per_model=c["per_model"]))
    for r in rows:
        r["ms_per_case"] = round(1000 * r["eval_s"] / len(suite), 2)  # all models
        r["ms_per_case_model"] = round(1000 * r["eval_s"] / cm, 2)
        r["tokens_per_s"] = round(r["generated_tokens"] / max(r["eval_s"], 1e-9), 1)
        r["hf_time_over_this"] = round(rows[1]["eval_s"] / max(r["eval_s"], 1e-9), 2)
        r["hf_wall_over_this"] = round(rows[1]["wall_s"] / max(r["wall_s"], 1e-9), 2)
    # lm-evaluation-harness runs once per model: each run pays import and load again.
    separate = rows[1]["eval_s"] + len(models) * rows[1]["startup_s"]

    print(f"\n{manifest['cases']} cases ({manifest['generated']} generated, {manifest['choices']} choices, {manifest['perplexity']} perplexity; "
          f"{manifest['chat']} chat) x {len(models)} models (base + {len(models) - 1} adapters), {manifest['shape']}, batch {hf['batch_size']}, "
          f"{hf['device']}")
    print(f"{'system':16} {'cases x models':>14} {'wall s':>8} {'eval s':>8} {'ms/case-model':>13} {'gen tok/s':>10} {'HF eval/this':>12} {'HF wall/this':>12}")
    for r in rows:
        est = "~" if r.get("generated_tokens_estimated") else " "
        print(f"{r['system']:16} {r['case_models']:>14} {r['wall_s']:>8.1f} {r['eval_s']:>8.1f} {r['ms_per_case_model']:>13.2f} "
              f"{est}{r['tokens_per_s']:>9.0f} {r['hf_time_over_this']:>12.2f} {r['hf_wall_over_this']:>12.2f}")
    print(f"(LoraKit eval s = its wall minus a one-case run's ({rows[0]['startup_s']:.1f} s: start, CUDA, model load); HF eval s = its timers; "
          f"~ = LoraKit's token count estimated; HF as lm-eval runs, one process per model: ~{separate:.0f} s)")
    g = agreement
    print(f"agreement: outputs {g['generated_outputs_equal']}, verdicts {g['verdicts_equal']} (Python checks reproduce LoraKit's: "
          f"{g['python_checks_reproduce_lorakit']}), choice picks {g['choice_picks_equal']}, max rel diff mean NLL {g['max_rel_diff_mean_nll']}, "
          f"perplexity {g['max_rel_diff_perplexity']}")

    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    json.dump(dict(manifest={k: v for k, v in manifest.items()}, rows=rows, hf_separate_runs_est_s=round(separate, 1), agreement=agreement,
                   hf_versions=hf.get("versions"), lorakit_version=report.get("lorakit_version"), settings=report.get("settings")),
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
