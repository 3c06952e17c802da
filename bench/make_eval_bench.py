"""Builds the evaluation benchmark's inputs (issue 18: 1,000 cases, a 1B-shape model, 4 adapters, one call).

    python3 bench/make_eval_bench.py [--shape llama-1b|tiny] [--cases 1000] [--seed 0]

Writes under /tmp/lorakit-bench/eval-<shape>/ and prints the manifest (also manifest.json there):
- model/: llama-1b is run_bench.prepare('llama-1b') (random init, seed 0, bf16) linked file by file, plus the fixture
  tokenizer (fixtures/models/llama) with its vocabulary padded to the model's 128,256 ids. Why padded: the fixture
  knows 400 ids and both LoraKit and HF drop ids they do not know when decoding, so a random 1B model's outputs would
  be almost empty and every text check trivial. The padding entries ("Ġthe12", letters then digits) have no merges,
  so no text ever encodes to them (prompts tokenize exactly as with the fixture); they only make outputs readable
  words. tiny is the fixture model itself (vocab 400), for a CPU run of the whole pipeline.
- adapters/a0..a3: PEFT adapters saved with save_pretrained, A as PEFT initialises it, B drawn (seeded) so each
  update B·A·scaling has entries of about half the base init's std: attention-only r=8, all-linear r=16, q/v r=32,
  MLP-only r=16 with rsLoRA. Without torch/peft (this is only the tiny CPU check) the fixture adapters stand in.
- suite/bench.jsonl: a deterministic suite (pure Python, seeded, the same on any machine): 60% generated cases
  (prompts of 32-200 tokens, max_tokens 16-64, every text expectation, task/capability/safety, a sixth of them chat
  "messages"), 25% choices (2-5), 15% perplexity texts (100-300 tokens). Token counts come from a small Python copy of
  the fixture's byte-level BPE (ASCII text only), checked against the HF tokenizer where transformers is installed.
"""
import argparse
import json
import os
import random
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "fixtures", "models", "llama")
WORK = "/tmp/lorakit-bench"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = [  # (name, LoraConfig kwargs): different targets, ranks and scalings, as a real set of adapters would be
    ("a0-attn-r8", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("a1-all-r16", dict(r=16, lora_alpha=32, target_modules=TARGETS)),
    ("a2-qv-r32", dict(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"])),
    ("a3-mlp-r16-rslora", dict(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True)),
]
FIXTURE_ADAPTERS = ["a", "b", "c", "a_b_cat"]  # tiny without torch
# Lengths per shape: (prompt tokens, max_tokens values, choices prompt tokens, perplexity tokens). tiny fits the fixture's
# 256-token context with the chat template's ~60 tokens around a prompt.
LENGTHS = {
    "llama-1b": dict(prompt=(32, 200), max_tokens=[16, 24, 32, 48, 64], choice_prompt=(16, 120), ppl=(100, 300), chat=(24, 120)),
    "tiny": dict(prompt=(12, 80), max_tokens=[8, 16, 24], choice_prompt=(8, 60), ppl=(40, 120), chat=(8, 60)),
}


# ---- the fixture tokenizer's byte-level BPE, for ASCII text (token counts without the tokenizers library) ----

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class MiniBpe:
    """The fixture's tokenizer.json (Llama-3-style split regex, byte level, ranked merges) on ASCII text."""
    # The split regex with \p{L} / \p{N} narrowed to ASCII, which is all the suite's text holds.
    SPLIT = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

    def __init__(self, tokenizer_json):
        m = tokenizer_json["model"]
        assert m["type"] == "BPE" and not m.get("ignore_merges"), "MiniBpe knows the fixture's plain BPE only"
        self.vocab = m["vocab"]
        merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
        self.ranks = {p: i for i, p in enumerate(merges)}
        self.byte = bytes_to_unicode()

    def word(self, w):
        syms = [self.byte[b] for b in w.encode()]
        while len(syms) > 1:
            best = min(range(len(syms) - 1), key=lambda i: self.ranks.get((syms[i], syms[i + 1]), 1 << 30))
            if (syms[best], syms[best + 1]) not in self.ranks:
                break
            syms[best:best + 2] = [syms[best] + syms[best + 1]]
        return [self.vocab[s] for s in syms]

    def encode(self, text, bos=True):
        assert text.isascii(), text
        ids = [0] if bos else []  # the post-processor's <|begin_of_text|>
        for piece in self.SPLIT.findall(text):
            ids += self.word(piece)
        return ids


# ---- the suite ----

# Words that are one fixture token after a space (checked in main): prompts of N words are about N tokens.
WORDS = ["you", "are", "after", "self", "line", "today", "is", "account", "goes", "return", "the", "and", "to", "in", "go", "do"]
KINDS = ["task"] * 5 + ["capability"] * 3 + ["safety"] * 2
SYSTEMS = ["You are a careful assistant.", "Answer in one line.", "Reply with JSON only."]


def text_of(rng, bpe, lo, hi, prefix=""):
    """Words (and a sentence end now and then) until the text encodes to a length drawn from [lo, hi] (BOS included)."""
    target = rng.randint(lo, hi)
    parts = [prefix] if prefix else []
    n = len(bpe.encode(" ".join(parts))) if parts else 1
    while n < target:
        w = rng.choice(WORDS)
        parts.append(w + ("." if rng.random() < 0.08 else ""))
        n += len(bpe.encode((" " if len(parts) > 1 else "") + parts[-1], bos=False))
    return " ".join(parts)


def expectation(rng):
    """One of every text check, drawn so that some pass and some fail on a random model's words."""
    k = rng.choice(["equals", "contains", "contains_all", "not_contains", "regex", "json"])
    if k == "equals":
        return {"equals": rng.choice(WORDS)}
    if k == "contains":
        return {"contains": rng.choice(WORDS)}
    if k == "contains_all":
        return {"contains": rng.sample(WORDS, 2)}
    if k == "not_contains":
        return {"not_contains": rng.sample(WORDS, 2)}
    if k == "json":
        return {"json": True}
    # Patterns in the common ground of .NET and Python regexes (eval_table.py re-checks outputs in Python).
    return {"regex": rng.choice([r"[0-9]", r"^\s*[a-m]", r"\b(you|are|the)\b", r"([a-z]+) \1", r"^[^.]{0,40}$", r"(?i)RETURN[0-9]*"])}


def make_suite(n, shape, bpe, seed):
    L = LENGTHS[shape]
    rng = random.Random(seed)
    n_gen, n_choice = round(n * 0.6), round(n * 0.25)
    kinds = ["gen"] * n_gen + ["choice"] * n_choice + ["ppl"] * (n - n_gen - n_choice)
    rng.shuffle(kinds)  # interleaved, as a real suite's lines would be
    cases, counter = [], {"gen": 0, "choice": 0, "ppl": 0}
    for kind in kinds:
        counter[kind] += 1
        cid = f"{kind}-{counter[kind]:04d}"
        if kind == "gen":
            c = {"id": cid, "kind": rng.choice(KINDS)}
            if rng.random() < 1 / 6:
                msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
                msgs.append({"role": "user", "content": text_of(rng, bpe, *L["chat"], prefix="Answer:")})
                c["messages"] = msgs
            else:
                c["prompt"] = text_of(rng, bpe, *L["prompt"], prefix="Continue:")
            c["expect"] = expectation(rng)
            c["max_tokens"] = rng.choice(L["max_tokens"])
        elif kind == "choice":
            k = rng.randint(2, 5)
            choices = [" " + w for w in rng.sample(WORDS, k)]
            c = {"id": cid, "kind": rng.choice(["task", "capability"]), "prompt": text_of(rng, bpe, *L["choice_prompt"], prefix="Pick:"),
                 "expect": {"choices": choices, "answer": rng.randrange(k)}}
        else:
            c = {"id": cid, "kind": "capability", "text": text_of(rng, bpe, *L["ppl"])}
        cases.append(c)
    return cases


# ---- model, tokenizer, adapters ----

def padded_tokenizer(vocab_size):
    """The fixture tokenizer.json with decode-only entries up to vocab_size (see the module doc)."""
    tok = json.load(open(os.path.join(FIXTURE, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    taken = set(vocab)
    nxt = max(vocab.values()) + 1
    i = 0
    while nxt < vocab_size:
        s = "Ġ" + WORDS[i % len(WORDS)] + str(i // len(WORDS))
        i += 1
        if s not in taken:
            vocab[s] = nxt
            nxt += 1
    return tok


def link_model(src, dst, vocab_size):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.startswith("tokenizer"):
            continue
        if not os.path.lexists(os.path.join(dst, f)):
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    json.dump(padded_tokenizer(vocab_size), open(os.path.join(dst, "tokenizer.json"), "w"), ensure_ascii=False)
    shutil.copy(os.path.join(FIXTURE, "tokenizer_config.json"), dst)


def have_peft():
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def make_adapters(model_dir, out, seed):
    """Random non-zero PEFT adapters on the model, saved with save_pretrained."""
    import math
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dirs = []
    for k, (name, kw) in enumerate(ADAPTERS):
        d = os.path.join(out, name)
        dirs.append(d)
        if os.path.exists(os.path.join(d, "adapter_model.safetensors")):
            continue
        # A fresh base per adapter (seconds on a GPU): get_peft_model modifies the model it is given.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev)
        init_std = model.config.initializer_range
        pm = get_peft_model(model, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **kw))
        g = torch.Generator().manual_seed(seed * 100 + k)
        scaling = kw["lora_alpha"] / (math.sqrt(kw["r"]) if kw.get("use_rslora") else kw["r"])
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    a = pm.get_parameter(n.replace("lora_B", "lora_A"))
                    # A's entries have std 1/sqrt(3·in) (kaiming uniform, a=√5); pick B's std so that scaling·B·A has
                    # entries of about init_std/2: a visible change, not a new model.
                    std_a = 1 / math.sqrt(3 * a.shape[1])
                    std_b = 0.5 * init_std / (scaling * math.sqrt(kw["r"]) * std_a)
                    p.copy_((torch.randn(p.shape, generator=g) * std_b).to(p.dtype))
        pm.save_pretrained(d)
        del pm, model
    return dirs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(LENGTHS), default="llama-1b")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = os.path.join(WORK, f"eval-{a.shape}")
    os.makedirs(out, exist_ok=True)
    bpe = MiniBpe(json.load(open(os.path.join(FIXTURE, "tokenizer.json"))))
    for w in WORDS:
        assert len(bpe.word(" " + w)) == 1, f"' {w}' is not one fixture token"

    if a.shape == "tiny":
        model_dir = FIXTURE
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import run_bench
        src = run_bench.prepare(a.shape)
        model_dir = os.path.join(out, "model")
        link_model(src, model_dir, json.load(open(os.path.join(src, "config.json")))["vocab_size"])

    if have_peft():
        adapters = make_adapters(model_dir, os.path.join(out, "adapters"), a.seed)
    elif a.shape == "tiny":
        adapters = [os.path.join(ROOT, "fixtures", "adapters", "llama", n) for n in FIXTURE_ADAPTERS]
    else:
        sys.exit("make_eval_bench: torch and peft are needed to make adapters for a 1B model")

    cases = make_suite(a.cases, a.shape, bpe, a.seed)
    suite = os.path.join(out, "suite", "bench.jsonl")
    os.makedirs(os.path.dirname(suite), exist_ok=True)
    with open(suite, "w") as f:
        for c in cases:
            f.write(json.dumps(c) + "\n")

    gen = [c for c in cases if "max_tokens" in c]
    prompt_tokens = [len(bpe.encode(c["prompt"])) for c in cases if "prompt" in c and "max_tokens" in c]
    manifest = dict(shape=a.shape, model=model_dir, adapters=adapters, suite=suite, cases=len(cases), generated=len(gen),
                    choices=sum("choices" in c.get("expect", {}) for c in cases), perplexity=sum("text" in c for c in cases),
                    chat=sum("messages" in c for c in cases), max_tokens_sum=sum(c["max_tokens"] for c in gen),
                    prompt_tokens=[min(prompt_tokens), max(prompt_tokens)])
    manifest["tokenizer_check"] = check_counts(model_dir, cases, bpe)
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=1)
    print(json.dumps(manifest))


def check_counts(model_dir, cases, bpe):
    """Where transformers is installed: how many prompts/texts MiniBpe encodes differently from the HF tokenizer."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return "skipped (no transformers)"
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [c.get("prompt") or c.get("text") for c in cases if "messages" not in c]
    bad = sum(tok(t)["input_ids"] != bpe.encode(t) for t in texts)
    return f"{bad} of {len(texts)} differ"


if __name__ == "__main__":
    main()
