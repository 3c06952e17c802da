"""The GEMM and attention floor of a LoRA training step, timed under sustained load (issue 6's analysis).

Runs, back to back on this GPU, exactly the big bf16 matmuls and attention calls that one LoRA step of a workload
cannot avoid (frozen base: forward, activation-gradient backward, LM head both ways; checkpointed runs also recompute
q/k/v, attention and the gate/up GEMMs of the layers whose outputs are not kept), repeated for a few seconds so the
clocks settle as they do in training. No LoRA branch, norms, activations, loss or optimizer: whatever a step costs
beyond this table is everything else. Compare its total with the measured step time and with 2.5x HF.
usage: python3 bench/gemm_floor.py [--kept 9 18 32]
"""
import argparse

import torch
import torch.nn.functional as F

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head dim, vocab, batch, seq, checkpointed
    "llama-1b 8x1024": (2048, 8192, 16, 32, 8, 64, 128256, 8, 1024, False),
    "llama-8b 2x2048 ckpt": (4096, 14336, 32, 32, 8, 128, 128256, 2, 2048, True),
}


def step_fn(hid, inter, layers, heads, kvh, hd, vocab, b, s, ckpt, kept):
    m = b * s
    dev, dt = "cuda", torch.bfloat16
    r = lambda *sh: torch.randn(*sh, device=dev, dtype=dt) * 0.02
    x, xi, dy_h, dy_i = r(m, hid), r(m, inter), r(m, hid), r(m, inter)
    wq, wkv, wo, wg, wd = r(heads * hd, hid), r(kvh * hd, hid), r(hid, heads * hd), r(inter, hid), r(hid, inter)
    lm = r(vocab, hid)
    out_h, out_kv, out_i, out_v = (torch.empty(m, n, device=dev, dtype=dt) for n in (hid, kvh * hd, inter, 4096))
    q = r(b, heads, s, hd).requires_grad_()
    k, v = r(b, kvh, s, hd).requires_grad_(), r(b, kvh, s, hd).requires_grad_()
    go = r(b, heads, s, hd)

    def fwd_attn_half():
        torch.mm(x, wq.t(), out=out_h); torch.mm(x, wkv.t(), out=out_kv); torch.mm(x, wkv.t(), out=out_kv)

    def fwd_mlp_up():
        torch.mm(x, wg.t(), out=out_i); torch.mm(x, wg.t(), out=out_i)

    chunk = 8016  # 128256 = 16 chunks: the logits are never materialised whole
    out_c = torch.empty(m, chunk, device=dev, dtype=dt)

    def lm_head_fwd_bwd():
        for c in range(0, vocab, chunk):
            w = lm[c:c + chunk]
            torch.mm(x, w.t(), out=out_c)
            torch.addmm(out_h, out_c, w, out=out_h)  # its dX, accumulated per chunk

    def attention(grad):
        with torch.set_grad_enabled(grad):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def step():
        saved = []
        for _ in range(layers):  # forward (checkpointed: no graph kept)
            fwd_attn_half(); saved.append(attention(not ckpt)); torch.mm(x, wo.t(), out=out_h)
            fwd_mlp_up(); torch.mm(xi, wd.t(), out=out_h)
        lm_head_fwd_bwd()
        for layer in range(layers):  # backward, with the replay's recompute when checkpointed
            if ckpt:
                fwd_attn_half()
                if layer >= kept:
                    fwd_mlp_up()
            torch.mm(dy_h, wd, out=out_i)                                             # down: dX
            torch.mm(dy_i, wg, out=out_h); torch.addmm(out_h, dy_i, wg, out=out_h)   # gate, up: dX
            torch.mm(dy_h, wo, out=out_h)                                             # o: dX
            o = attention(True) if ckpt else saved.pop()                              # (the replay's attention forward)
            torch.autograd.grad(o, (q, k, v), go)
            torch.mm(dy_h, wq, out=out_h); torch.addmm(out_h, out_kv, wkv, out=out_h); torch.addmm(out_h, out_kv, wkv, out=out_h)
    return step


def timed(fn, seconds=4.0):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record(); fn(); e.record(); torch.cuda.synchronize()
    n = max(3, int(seconds * 1000 / s.elapsed_time(e)))
    for _ in range(2):
        fn()
    s.record()
    for _ in range(n):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kept", nargs="*", type=int, default=[9, 18, 32], help="checkpointed: layers whose gate/up are kept")
    a = ap.parse_args()
    print(f"{'workload':<22} {'gate/up kept':>12} {'floor ms':>9} {'tok/s at floor':>15}")
    for name, shp in SHAPES.items():
        m = shp[7] * shp[8]
        for kept in (a.kept if shp[9] else [0]):
            ms = timed(step_fn(*shp, kept))
            print(f"{name:<22} {(str(kept) if shp[9] else '-'):>12} {ms:>9.1f} {m / ms * 1000:>15.0f}", flush=True)


if __name__ == "__main__":
    main()
