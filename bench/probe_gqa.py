"""GQA attention options on this GPU, fwd+bwd timed with CUDA events (one-off probe for issue 6).

Compares what LoraKit does now (repeat k/v to every query head, then SDPA) with SDPA's enable_gqa and with the flash and
cuDNN kernels called on the un-repeated k/v, for the llama-8b (2x2048, D=128) and llama-1b (8x1024, D=64) shapes.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)


def timed(fn, n=20):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


for name, b, t, h, hk, d in [("llama-8b", 2, 2048, 32, 8, 128), ("llama-1b", 8, 1024, 32, 8, 64)]:
    q0 = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
    k0 = torch.randn(b, t, hk, d, device="cuda", dtype=torch.bfloat16)
    v0 = torch.randn(b, t, hk, d, device="cuda", dtype=torch.bfloat16)
    go = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
    rep = h // hk

    def run(variant):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        qt = q.transpose(1, 2)
        if variant == "repeat":
            kk = k.unsqueeze(3).expand(b, t, hk, rep, d).reshape(b, t, h, d).transpose(1, 2)
            vv = v.unsqueeze(3).expand(b, t, hk, rep, d).reshape(b, t, h, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qt, kk, vv, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
        o.backward(go)
        return o, q.grad, k.grad, v.grad

    ref = run("repeat")
    print(f"{name}: repeat+sdpa(default) {timed(lambda: run('repeat')):.3f} ms fwd+bwd", flush=True)
    for label, backends in [("gqa default", None), ("gqa cudnn", [SDPBackend.CUDNN_ATTENTION]),
                            ("gqa flash", [SDPBackend.FLASH_ATTENTION]), ("gqa efficient", [SDPBackend.EFFICIENT_ATTENTION])]:
        for lab2, var in [(label, "gqa")] + ([("repeat " + label.split()[1], "repeat")] if backends else []):
            try:
                if backends:
                    with sdpa_kernel(backends):
                        got = run(var)
                        ms = timed(lambda: run(var))
                else:
                    got = run(var)
                    ms = timed(lambda: run(var))
                err = max((a.float() - r.float()).abs().max().item() for a, r in zip(got, ref))
                print(f"{name}: {lab2:<16} {ms:.3f} ms fwd+bwd, max |diff| vs repeat {err:.3e}", flush=True)
            except Exception as ex:
                print(f"{name}: {lab2:<16} unsupported: {str(ex).splitlines()[0][:160]}", flush=True)
