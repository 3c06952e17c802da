using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// The arithmetic by which the families differ, as transformers computes it, for the reference modules to call with the
/// fields of <see cref="ModelConfig"/>: RMSNorm by <see cref="NormKind"/>, the gate activation, soft-capping, the
/// embedding scale, splitting Phi-3's fused projections, and eager attention (SDPA has no soft-cap). Each function is
/// pure: it returns a new tensor and keeps nothing.
/// </summary>
public static class FamilyOps
{
    /// <summary>
    /// RMSNorm over the last dimension. <see cref="NormKind.Weight"/>: normalise in fp32, cast back, multiply by w (Llama).
    /// <see cref="NormKind.OnePlusWeight"/>: normalise and multiply by (1 + w) in fp32, then cast (Gemma; the order of
    /// the cast and the product differs, which bf16 shows).
    /// </summary>
    public static Tensor RmsNorm(Tensor x, Tensor weight, double eps, NormKind kind)
    {
        using var scope = NewDisposeScope();
        var dtype = x.dtype;
        var h = x.to(ScalarType.Float32);
        h = h * rsqrt(h.Pow(2L).mean([-1], keepdim: true).Plus(eps));
        var y = kind == NormKind.Weight ? weight * h.to(dtype) : (h * weight.to(ScalarType.Float32).Plus(1.0)).to(dtype);
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>The MLP's gate activation: silu, or GELU with the tanh approximation ("gelu_pytorch_tanh").</summary>
    public static Tensor Activate(Tensor gate, Activation act) => act switch
    {
        Activation.Silu => nn.functional.silu(gate),
        Activation.GeluTanh => nn.functional.gelu(gate, TorchSharp.Modules.GELU.Approximate.tanh),
        _ => throw new ArgumentOutOfRangeException(nameof(act)),
    };

    /// <summary>cap · tanh(x / cap) in x's dtype (Gemma 2's attention scores and final logits); x itself when cap is null.</summary>
    public static Tensor SoftCap(Tensor x, double? cap)
    {
        if (cap is not double c) return x.alias();
        using var scope = NewDisposeScope();
        return x.DividedBy(c).tanh().Times(c).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Embeddings times Gemma's √hidden: the scalar is made an fp32 tensor and rounded to the embeddings' dtype first, as
    /// transformers does (bf16: √3072 = 55.43 becomes 55.5); <paramref name="h"/> itself when scale is null. The rounding
    /// happens on the host and the product takes the rounded value as a number (exact in fp32, which is what a
    /// half-precision product computes in), so no host-to-device copy runs inside a captured CUDA graph.
    /// </summary>
    public static Tensor ScaleEmbedding(Tensor h, double? scale)
    {
        if (scale is not double s) return h.alias();
        using var scope = NewDisposeScope();
        double rounded = tensor((float)s).to(h.dtype).to(ScalarType.Float32).item<float>();
        return h.Times(rounded).MoveToOuterDisposeScope();
    }

    /// <summary>Phi-3's qkv_proj output [.., (H + 2·kvH)·D] as q [.., H·D], k and v [.., kvH·D] (views).</summary>
    public static (Tensor q, Tensor k, Tensor v) SplitQkv(Tensor qkv, int heads, int kvHeads, int headDim)
    {
        long q = (long)heads * headDim, kv = (long)kvHeads * headDim;
        if (qkv.shape[^1] != q + 2 * kv)
            throw new ArgumentException($"fused qkv has {qkv.shape[^1]} features, expected {q + 2 * kv}", nameof(qkv));
        return (qkv.narrow(-1, 0, q), qkv.narrow(-1, q, kv), qkv.narrow(-1, q + kv, kv));
    }

    /// <summary>Phi-3's gate_up_proj output [.., 2·I] as gate and up [.., I] (views; gate first, as transformers' chunk).</summary>
    public static (Tensor gate, Tensor up) SplitGateUp(Tensor gateUp)
    {
        long half = gateUp.shape[^1] / 2;
        return (gateUp.narrow(-1, 0, half), gateUp.narrow(-1, half, half));
    }

    /// <summary>
    /// transformers' eager attention: scores = q·kᵀ·scale in the activations' dtype, soft-capped, masked (disallowed keys get
    /// the dtype's lowest value, as transformers' additive masks do, so a fully masked padding row stays finite), softmax in
    /// fp32 cast back, times v. q [B, H, T, D]; k, v [B, H, S, D] (kv heads already repeated); mask bool [B or 1, 1, T, S]
    /// (true = may attend) or null for no mask at all.
    /// </summary>
    public static Tensor EagerAttention(Tensor q, Tensor k, Tensor v, Tensor? mask, double scale, double? softcap)
    {
        using var scope = NewDisposeScope();
        var scores = matmul(q, k.transpose(-2, -1)).Times(scale);
        scores = SoftCap(scores, softcap);
        if (mask is not null) scores = scores.MaskedFill(mask.logical_not(), LowestOf(scores.dtype));
        var weights = scores.softmax(-1, ScalarType.Float32).to(q.dtype);
        return matmul(weights, v).MoveToOuterDisposeScope();
    }

    static double LowestOf(ScalarType dtype) => dtype switch
    {
        ScalarType.Float16 => -65504.0,
        ScalarType.BFloat16 => -3.3895313892515355e38,
        ScalarType.Float64 => double.MinValue,
        _ => float.MinValue,
    };
}
