"""The HF peer of `lorakit bench-serve` (issue 21): HF transformers `generate`, and PEFT on top of it, serving the
benchmark's loads on the same random-init Llama-3.2-1B-shape checkpoint (bench/run_bench.py's `prepare('llama-1b')`).

On the GPU machine, from the repo root (bench/run_serve_bench.sh calls it):
    python3 bench/hf_serve_peer.py [--only eager,compiled,peft] [--loads A,B128,B512] [--budget-s S] [--quick]
Smoke test without a GPU (the tiny fixture model, fp32, a few tokens):
    python3 bench/hf_serve_peer.py --quick --cpu

Loads (every request arrives at t = 0; prompts are random ids, seed 0, no padding):
  A     64 requests, 128 prompt tokens, 64 new tokens
  B128  256 requests, 128 prompt tokens, 128 new tokens
  B512  256 requests, 512 prompt tokens, 128 new tokens
Every request generates exactly its new tokens: min_new_tokens = max_new_tokens, so EOS is masked until the end.

Runs, in this order (cheapest and most needed first, so a budget cut drops the least):
  hf-eager            A at batch 32 and 64; B128, B512 at batch 32. DynamicCache, sdpa, bf16.
  hf-static-compiled  A, B128, B512 at batch 32. `cache_implementation="static"`: transformers then compiles the decode
                      step itself (generate's auto-compile, as transformers' docs recommend for static caches; its
                      default CompileConfig: torch.compile of the model call, mode "reduce-overhead", so CUDA graphs,
                      fullgraph off, dynamic None; the prefill stays eager). One warm-up
                      generate per (batch, prompt, new tokens) shape runs OUTSIDE the timed region: that is where the
                      compile and the graph capture happen ("compile_s" in the row). The static cache has the shape
                      prompt + new tokens, so each load compiles once. --compile forward instead compiles
                      model.forward by hand (mode reduce-overhead, fullgraph) and turns generate's own compile off.
  hf-peft-eager       A only, batch 32: a PEFT LoraModel (get_peft_model) with k adapters, rank 16, alpha 32, all seven
                      projections, init_lora_weights=False (random, non-zero B), seeds 100 + j. k = 1: plain generate
                      with the one active adapter. k = 8, 32: one batch mixes adapters through
                      `generate(adapter_names=[...])` (PEFT's mixed-batch inference); request r uses adapter r mod k.
                      The adapters are cast to bf16 like the model (--peft-fp32 keeps PEFT's default fp32 adapters).
                      The PEFT runs wrap a second copy of the model, so the base runs never see LoRA layers.

Metrics per run (HF serves a load as static batches, one after the other):
  tokens_per_s  generated tokens / wall seconds from the first batch's start to the last batch's end (prefill included);
  TTFT          of a request: from the start of the run (when all requests arrived) to its batch's first generated token,
                timed inside the measured generate by a streamer: generate hands the streamer the prompt, then each new
                token after copying it to the host (`.cpu()`, a sync), so the second `put` is the first token's time;
  TPOT          of a request: (batch end - batch's first token) / (new tokens - 1), i.e. (batch time - prefill time) /
                (new tokens - 1);
  p50 / p99     nearest-rank percentiles over the requests (the smallest value with at least p% of requests at or
                below it), so a percentile is always some request's own value, never a blend of two batches.
One JSON line per run on stdout (and appended to --out if given):
  {"system", "load", "batch", "adapters", "requests", "prompt_tokens", "new_tokens", "tokens_per_s", "ttft_p50_ms",
   "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "seconds", ...}; a failed run gives "error", a run cut by --budget-s
   gives "skipped".
"""
import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_MODEL = "/tmp/lorakit-bench/llama-1b"
CPU_MODEL = os.path.join(HERE, "..", "fixtures", "models", "llama")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name: (requests, prompt tokens, new tokens)
LOADS = {"A": (64, 128, 64), "B128": (256, 128, 128), "B512": (256, 512, 128)}
QUICK_LOADS = {"A": (8, 16, 8), "B128": (8, 16, 12), "B512": (8, 32, 12)}
# Rough generated tokens/s on the H200 (issue 21's measurements) and compile seconds, only to decide whether a run
# still fits in --budget-s before starting it; a run is never cut once started.
RATE_GUESS = {"hf-eager": 2000.0, "hf-static-compiled": 7000.0, "hf-peft-eager": 1000.0}
COMPILE_GUESS_S = 90.0


def nearest_rank(values, p):
    """The p-th percentile by nearest rank: the smallest value with at least p% of the values at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def streamer_base():
    try:
        from transformers.generation.streamers import BaseStreamer
        return BaseStreamer
    except ImportError:  # generate only calls put() and end()
        return object


class FirstTokenClock(streamer_base()):
    """A streamer that only notes when the first generated token reached the host (its second put: the first is the
    prompt). generate copies each token to the host before put, so the time is the token's, not a queued kernel's."""

    def __init__(self):
        self.puts = 0
        self.first = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


class Budget:
    """Starts no run that would likely end past --budget-s seconds from the start of this process."""

    def __init__(self, seconds):
        self.seconds = seconds

    def allows(self, estimate_s):
        return self.seconds is None or time.perf_counter() - T_START + estimate_s <= self.seconds


def dynamo_graphs():
    """Graphs torch.compile has built in this process so far: 0 after a "compiled" run means nothing was compiled."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def load_model(path, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def prompts_for(load, loads, vocab, device):
    n, p, _ = loads[load]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, p), generator=g).to(device)


def generate(model, ids, new_tokens, pad, streamer=None, adapter_names=None, **extra):
    kw = dict(adapter_names=adapter_names) if adapter_names is not None else {}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                              pad_token_id=pad, streamer=streamer, **kw, **extra)


def serve(model, prompts, batch, new_tokens, pad, adapters_of=None, **extra):
    """Serves all prompts as consecutive static batches; returns tokens, seconds and per-request TTFT/TPOT (s)."""
    n, p = prompts.shape
    ttft, tpot, tokens, streamed = [], [], 0, True
    sync()
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        ids = prompts[i:i + batch]
        clock = FirstTokenClock()
        names = [adapters_of(r) for r in range(i, i + len(ids))] if adapters_of else None
        out = generate(model, ids, new_tokens, pad, streamer=clock, adapter_names=names, **extra)
        sync()
        end = time.perf_counter()
        made = out.shape[1] - p
        if made != new_tokens:
            raise RuntimeError(f"generate made {made} tokens per row, not {new_tokens} (min_new_tokens not honoured?)")
        tokens += made * len(ids)
        streamed = streamed and clock.first is not None
        first = clock.first if clock.first is not None else end  # no streamer call: TTFT = batch end, ttft_timed false
        ttft += [first - t0] * len(ids)
        tpot += [(end - first) / max(new_tokens - 1, 1)] * len(ids)
    seconds = time.perf_counter() - t0
    return tokens, seconds, ttft, tpot, streamed


def row(system, load, loads, batch, adapters, tokens, seconds, ttft, tpot, **more):
    n, p, t = loads[load]
    r = dict(system=system, load=load, batch=batch, adapters=adapters, requests=n, prompt_tokens=p, new_tokens=t,
             generated_tokens=tokens, tokens_per_s=round(tokens / seconds, 1),
             ttft_p50_ms=round(nearest_rank(ttft, 50) * 1e3, 2), ttft_p99_ms=round(nearest_rank(ttft, 99) * 1e3, 2),
             tpot_p50_ms=round(nearest_rank(tpot, 50) * 1e3, 3), tpot_p99_ms=round(nearest_rank(tpot, 99) * 1e3, 3),
             seconds=round(seconds, 3))
    r.update(more)
    return r


class Peer:
    def __init__(self, a):
        self.a = a
        self.device = "cpu" if a.cpu else "cuda"
        self.dtype = torch.float32 if a.cpu else torch.bfloat16
        self.loads = QUICK_LOADS if a.quick else LOADS
        self.batch = a.batch or (4 if a.quick else 32)
        self.budget = Budget(a.budget_s)
        self.path = a.model or (CPU_MODEL if a.cpu else BENCH_MODEL)
        if not os.path.exists(os.path.join(self.path, "config.json")):
            if a.model:
                sys.exit(f"hf_serve_peer: no config.json in --model {self.path}")
            sys.path.insert(0, HERE)
            import run_bench
            run_bench.prepare("llama-1b")
        t = time.perf_counter()
        self.model = load_model(self.path, self.device, self.dtype)
        sync()
        self.load_s = time.perf_counter() - t
        self.vocab = self.model.config.vocab_size
        self.pad = 0
        self.compiled_shapes = set()

    def emit(self, r):
        line = json.dumps(r)
        print(line, flush=True)
        if self.a.out:
            with open(self.a.out, "a") as f:
                f.write(line + "\n")

    def attempt(self, system, load, batch, adapters, fn, compile_estimate_s=0.0):
        """Runs fn() -> row unless the budget forbids it; a failure becomes an error row and the next run goes on."""
        n, p, t = self.loads[load]
        base = dict(system=system, load=load, batch=batch, adapters=adapters, requests=n, prompt_tokens=p, new_tokens=t)
        rate = RATE_GUESS[system] / (1 + adapters / 4 if system == "hf-peft-eager" and adapters > 1 else 1)
        if not self.budget.allows(compile_estimate_s + n * t / rate):
            self.emit(dict(base, skipped=f"budget: {self.a.budget_s:.0f} s"))
            return
        try:
            self.emit(fn())
        except Exception as e:  # a compile or PEFT failure must not cost the other rows
            self.emit(dict(base, error=f"{type(e).__name__}: {str(e)[:400]}"))
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def warm(self, model, prompts, batch, new_tokens, adapters_of=None, **extra):
        """One generate of the run's batch shape outside the timed region (cuBLAS handles, compile, graph capture)."""
        sync()
        t = time.perf_counter()
        ids = prompts[:batch]
        names = [adapters_of(r) for r in range(len(ids))] if adapters_of else None
        generate(model, ids, new_tokens, self.pad, adapter_names=names, **extra)
        sync()
        return time.perf_counter() - t

    def eager(self, load, batch):
        n, _, t = self.loads[load]
        prompts = prompts_for(load, self.loads, self.vocab, self.device)

        def run():
            self.warm(self.model, prompts, batch, min(t, 4))
            tokens, secs, ttft, tpot, streamed = serve(self.model, prompts, batch, t, self.pad)
            return row("hf-eager", load, self.loads, batch, 0, tokens, secs, ttft, tpot, ttft_timed=streamed)
        self.attempt("hf-eager", load, batch, 0, run)

    def compiled(self, load, batch):
        n, p, t = self.loads[load]
        prompts = prompts_for(load, self.loads, self.vocab, self.device)
        shape = (batch, p, t)

        def run():
            extra = dict(cache_implementation="static")
            if self.a.compile == "forward":
                extra["disable_compile"] = True  # our compiled forward only, not generate's on top of it
                if not getattr(self, "_forward_compiled", False):
                    self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)
                    self._forward_compiled = True
            compile_s = self.warm(self.model, prompts, batch, t, **extra)
            # cudagraph trees record on the first calls of a shape; a second warm-up replays, so the timed run does too
            self.warm(self.model, prompts, batch, t, **extra)
            self.compiled_shapes.add(shape)
            tokens, secs, ttft, tpot, streamed = serve(self.model, prompts, batch, t, self.pad, **extra)
            return row("hf-static-compiled", load, self.loads, batch, 0, tokens, secs, ttft, tpot, ttft_timed=streamed,
                       compile_s=round(compile_s, 1), compile=self.a.compile, dynamo_graphs=dynamo_graphs())
        est = 0.0 if shape in self.compiled_shapes else COMPILE_GUESS_S
        self.attempt("hf-static-compiled", load, batch, 0, run, compile_estimate_s=est)

    def peft_model(self, k):
        """A fresh copy of the base wrapped in a PEFT LoraModel with k random adapters a0..a{k-1}."""
        from peft import LoraConfig, get_peft_model
        base = load_model(self.path, self.device, self.dtype)
        cfg = lambda: LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
        torch.manual_seed(100)
        m = get_peft_model(base, cfg(), adapter_name="a0")
        for j in range(1, k):
            torch.manual_seed(100 + j)
            m.add_adapter(f"a{j}", cfg())
        dtype = torch.float32 if self.a.peft_fp32 else self.dtype
        with torch.no_grad():
            for name, prm in m.named_parameters():
                if "lora_" in name:
                    prm.data = prm.data.to(device=self.device, dtype=dtype)
        m.set_adapter("a0")
        return m.eval()

    def peft(self, load, batch, k):
        n, _, t = self.loads[load]
        prompts = prompts_for(load, self.loads, self.vocab, self.device)

        def run():
            m = self.peft_model(k)
            try:
                adapters_of = (lambda r: f"a{r % k}") if k > 1 else None
                self.warm(m, prompts, batch, min(t, 4), adapters_of=adapters_of)
                tokens, secs, ttft, tpot, streamed = serve(m, prompts, batch, t, self.pad, adapters_of=adapters_of)
                return row("hf-peft-eager", load, self.loads, batch, k, tokens, secs, ttft, tpot, ttft_timed=streamed,
                           mixed=k > 1, adapter_dtype="fp32" if self.a.peft_fp32 else str(self.dtype).replace("torch.", ""))
            finally:
                del m
        self.attempt("hf-peft-eager", load, batch, k, run)


def parse_list(s, allowed, flag):
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        sys.exit(f"hf_serve_peer: {flag} takes {','.join(allowed)}; got {','.join(bad)}")
    return items


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="eager,compiled,peft", help="comma list of eager, compiled, peft (default: all)")
    ap.add_argument("--loads", default="A,B128,B512", help="comma list of A, B128, B512 (default: all)")
    ap.add_argument("--model", help=f"model directory (default {BENCH_MODEL}, built by run_bench.prepare if missing; "
                                    "with --cpu the fixture llama)")
    ap.add_argument("--batch", type=int, help="batch of every run except eager A's second (64); default 32 (4 with --quick)")
    ap.add_argument("--peft-adapters", default="1,8,32", help="adapter counts of the PEFT runs (default 1,8,32)")
    ap.add_argument("--peft-fp32", action="store_true", help="keep PEFT's default fp32 adapters instead of casting them to bf16")
    ap.add_argument("--compile", choices=["auto", "forward"], default="auto",
                    help="auto: generate compiles its decode step (static cache); forward: torch.compile(model.forward)")
    ap.add_argument("--budget-s", type=float, help="start no run likely to end later than this many seconds after start")
    ap.add_argument("--quick", action="store_true", help="tiny loads (8 requests, 16-32 prompt, 8-12 new tokens, batch 4)")
    ap.add_argument("--cpu", action="store_true", help="with --quick: the fixture llama on the CPU in fp32 (smoke test)")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    a = ap.parse_args()
    only = parse_list(a.only, ["eager", "compiled", "peft"], "--only")
    loads = parse_list(a.loads, list(LOADS), "--loads")
    if a.cpu and not a.quick:
        sys.exit("hf_serve_peer: --cpu is a smoke test only; use it with --quick")
    if not a.cpu and not torch.cuda.is_available():
        sys.exit("hf_serve_peer: CUDA is not available (this benchmark runs on the GPU machine; "
                 "`--quick --cpu` smoke-tests the script on the fixture model)")
    torch.manual_seed(0)
    peer = Peer(a)
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    print(json.dumps(dict(info="hf_serve_peer", torch=torch.__version__, transformers=transformers.__version__,
                          peft=peft_version, device=torch.cuda.get_device_name(0) if not a.cpu else "cpu",
                          model=peer.path, load_s=round(peer.load_s, 2), import_s=round(time.perf_counter() - T_START - peer.load_s, 2))),
          flush=True)
    b = peer.batch
    if "eager" in only and "A" in loads:
        peer.eager("A", b)
    if "compiled" in only and "A" in loads:
        peer.compiled("A", b)
    if "eager" in only and "A" in loads:
        peer.eager("A", 2 * b)  # the second HF eager row: batch 64
    if "peft" in only and "A" in loads:
        for k in [int(x) for x in a.peft_adapters.split(",") if x.strip()]:
            peer.peft("A", b, k)
    for load in [x for x in loads if x != "A"]:
        if "eager" in only:
            peer.eager(load, b)
    for load in [x for x in loads if x != "A"]:
        if "compiled" in only:
            peer.compiled(load, b)


if __name__ == "__main__":
    main()
