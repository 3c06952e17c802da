"""The HF peer of `lorakit eval`: the same suite on the same base and adapters, done as an HF user would.

    python3 bench/eval_peer.py --model DIR --adapter A0 [--adapter A1 ...] --suite FILE.jsonl [--batch-size 32]
                               [--cases-out FILE.json] [--compile] [--device cuda]

lm-evaluation-harness' way, in one process (lm-eval itself would take one run, and one model load, per model): the
model loaded once in bf16 with sdpa attention; the base first, then PeftModel.from_pretrained / load_adapter /
set_adapter for each adapter. Generated cases with model.generate (greedy, left padding), grouped by max_tokens as
lm-eval groups requests by their generation settings, each group sorted by prompt length and cut into batches of
--batch-size; a row stops at the first EOS id (generation_config.json's ids plus the tokenizer's EOS, LoraKit's rule
and vLLM's). Choices and perplexity texts by batched forward log-likelihood (right padding, fp32 log-softmax): the
summed log-probability of each choice's tokens after the prompt's, and the mean NLL of a text's tokens after its
first (BOS). Chat cases through tokenizer.apply_chat_template(add_generation_prompt=True). Every input is tokenized as
LoraKit tokenizes it (prompt with BOS, choice without), so both systems score the same ids.
Prints one JSON line with the times; --cases-out gets every case's output, pick or NLL per model for eval_table.py.
--compile: static KV cache, which makes transformers compile the decoding step (slow to warm up; off by default).
"""
import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

T_IMPORTED = time.perf_counter()


def read_suite(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def eos_ids(model_dir, tok):
    """generation_config.json's eos_token_id (else config.json's), plus the tokenizer's EOS token."""
    ids = None
    for f in ("generation_config.json", "config.json"):
        p = os.path.join(model_dir, f)
        if ids is None and os.path.exists(p):
            ids = json.load(open(p)).get("eos_token_id")
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def encode(cases, tok):
    """Every case's ids: a prompt with the tokenizer's BOS, a chat case rendered by its template, a text with BOS."""
    for c in cases:
        if "messages" in c:
            text = tok.apply_chat_template(c["messages"], add_generation_prompt=True, tokenize=False)
            c["ids"] = tok(text, add_special_tokens=False)["input_ids"]
        else:
            c["ids"] = tok(c.get("prompt") or c["text"])["input_ids"]
        if "choices" in c.get("expect", {}):
            c["choice_ids"] = [tok(x, add_special_tokens=False)["input_ids"] for x in c["expect"]["choices"]]


def generate(model, tok, cases, batch, eos, pad, compile_):
    """{id: {"output", "tokens", "eos"}} for the generated cases, and the tokens generated."""
    out, n_tokens = {}, 0
    groups = {}
    for c in cases:
        groups.setdefault(c.get("max_tokens", 64), []).append(c)  # LoraKit's EvalCase.DefaultMaxTokens
    extra = dict(cache_implementation="static") if compile_ else {}
    for max_new, group in sorted(groups.items()):
        group.sort(key=lambda c: -len(c["ids"]))  # lm-eval's order: longest first
        for i in range(0, len(group), batch):
            rows = group[i:i + batch]
            s = max(len(c["ids"]) for c in rows)
            ids = torch.tensor([[pad] * (s - len(c["ids"])) + c["ids"] for c in rows], device=model.device)
            mask = torch.tensor([[0] * (s - len(c["ids"])) + [1] * len(c["ids"]) for c in rows], device=model.device)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad, **extra)
            for c, row in zip(rows, gen[:, s:].tolist()):
                stop = next((k for k, t in enumerate(row) if t in eos), None)
                toks = row if stop is None else row[:stop + 1]  # the EOS counts as generated, as in LoraKit
                n_tokens += len(toks)
                out[c["id"]] = {"output": tok.decode(toks, skip_special_tokens=True), "tokens": len(toks), "eos": stop is not None}
    return out, n_tokens


def loglikelihoods(model, rows, batch, pad):
    """Summed log-probability of each (context, continuation) row's continuation, in row order."""
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    sums = [0.0] * len(rows)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        s = max(len(rows[k][0]) + len(rows[k][1]) for k in idx)
        ids = torch.tensor([rows[k][0] + rows[k][1] + [pad] * (s - len(rows[k][0]) - len(rows[k][1])) for k in idx], device=model.device)
        mask = (torch.arange(s, device=model.device)[None, :] < torch.tensor([len(rows[k][0]) + len(rows[k][1]) for k in idx], device=model.device)[:, None]).long()
        with torch.no_grad():
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for r, k in enumerate(idx):
            c, x = rows[k]
            pos = torch.arange(len(c) - 1, len(c) + len(x) - 1, device=model.device)
            sums[k] = logp[r, pos, torch.tensor(x, device=model.device)].sum().item()
        del logp
    return sums


def score(model, cases, batch, pad):
    """{id: {"pick", "output"}} for choices cases and {id: {"mean_nll", "tokens"}} for perplexity texts."""
    rows, owners = [], []
    for c in cases:
        if "text" in c:
            rows.append((c["ids"][:1], c["ids"][1:]))
            owners.append((c, -1))
        elif "choice_ids" in c:
            for j, x in enumerate(c["choice_ids"]):
                rows.append((c["ids"], x))
                owners.append((c, j))
    sums = loglikelihoods(model, rows, batch, pad)
    out = {}
    for (c, j), s, (_, x) in zip(owners, sums, rows):
        if j < 0:
            out[c["id"]] = {"mean_nll": -s / len(x), "tokens": len(x)}
        else:
            best = out.setdefault(c["id"], {"pick": 0, "best": None})
            if best["best"] is None or s > best["best"]:  # the first of equal highest, as LoraKit's MaxBy
                best.update(pick=j, best=s, output=c["expect"]["choices"][j])
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--suite", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cases-out")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    cases = read_suite(a.suite)
    encode(cases, tok)
    eos = eos_ids(a.model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    tokenize_s = time.perf_counter() - t

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype), attn_implementation="sdpa").to(a.device).eval()
    sync()
    load_s = time.perf_counter() - t

    gen_cases = [c for c in cases if "text" not in c and not {"choices", "label", "rubric"} & set(c["expect"])]
    results, per_model, adapter_load_s = {}, [], 0.0
    names = ["base"] + a.adapter
    m = model
    for k, name in enumerate(names):
        if k > 0:
            t = time.perf_counter()
            if k == 1:
                m = PeftModel.from_pretrained(model, name, adapter_name="a0")
                for j, other in enumerate(a.adapter[1:], 1):
                    m.load_adapter(other, adapter_name=f"a{j}")
                m.eval()
            m.set_adapter(f"a{k - 1}")
            sync()
            adapter_load_s += time.perf_counter() - t
        t = time.perf_counter()
        gen, n_tokens = generate(m, tok, gen_cases, a.batch_size, eos, pad, a.compile)
        sync()
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        scored = score(m, cases, a.batch_size, pad)
        sync()
        score_s = time.perf_counter() - t
        results[name] = {**gen, **scored}
        per_model.append(dict(model=name, gen_s=round(gen_s, 3), score_s=round(score_s, 3), generated_tokens=n_tokens))
        print(json.dumps(dict(progress=per_model[-1])), flush=True)

    # Tokenizing the suite is part of the evaluation (LoraKit encodes inside its run too); loading the model is not.
    eval_s = tokenize_s + adapter_load_s + sum(p["gen_s"] + p["score_s"] for p in per_model)
    gen_tokens = sum(p["generated_tokens"] for p in per_model)
    gen_s = sum(p["gen_s"] for p in per_model)
    res = dict(system="hf-peft" + ("-compile" if a.compile else ""), cases=len(cases), models=len(names), batch_size=a.batch_size,
               import_s=round(T_IMPORTED - T_START, 3), tokenize_s=round(tokenize_s, 3), load_s=round(load_s, 3),
               adapter_load_s=round(adapter_load_s, 3), gen_s=round(gen_s, 3), score_s=round(sum(p["score_s"] for p in per_model), 3),
               eval_s=round(eval_s, 3), total_s=round(time.perf_counter() - T_START, 3), generated_tokens=gen_tokens,
               gen_tokens_per_s=round(gen_tokens / max(gen_s, 1e-9), 1), per_model=per_model,
               versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__),
               device=torch.cuda.get_device_name(0) if a.device.startswith("cuda") else a.device)
    if a.cases_out:
        json.dump(dict(models=names, results=results), open(a.cases_out, "w"))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
