using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>One LLM.int8 weight in bitsandbytes' storage: <c>P.weight</c> int8 [out, in] and <c>P.SCB</c> fp32 [out] row absmax.</summary>
public sealed record Int8Weight(Tensor Weight, Tensor Scb) : IDisposable
{
    /// <inheritdoc/>
    public void Dispose() { Weight.Dispose(); Scb.Dispose(); }
}

/// <summary>
/// bnb's row-wise int8 storage (<c>Int8Params</c> / <c>int8_vectorwise_quant</c>, threshold 0): the weight is rounded to
/// fp16 first (bnb always quantizes from fp16), SCB is each row's absmax (fp32), and q = round-half-even(w × (127 / SCB)).
/// Dequantization is bnb's <c>int8_vectorwise_dequant</c>: (q × SCB) × fp32(1/127). The outlier decomposition of
/// LLM.int8 matmuls is a compute-time feature and not part of the storage; LoraKit computes with the dequantized weight.
/// Differences from bnb's CUDA kernel: it divides with <c>__fdividef</c> (approximate), so a value within an ulp of a
/// .5 boundary may round the other way. An all-zero row gets SCB 0 and q 0 (bnb would produce NaN casts).
/// </summary>
public static class Int8RowWise
{
    /// <summary>fp32(1/127), the constant bnb multiplies by.</summary>
    public const float InverseOf127 = 7.874015718698502e-3f;

    /// <summary>Quantizes a 2-D weight [out, in].</summary>
    public static Int8Weight Quantize(Tensor w)
    {
        if (w.dim() != 2) throw new ArgumentException($"int8 row-wise quantization takes a 2-D weight, got {w.dim()}-D");
        using var scope = NewDisposeScope();
        var w16 = w.to(ScalarType.Float16).to(ScalarType.Float32);
        var scb = w16.abs().amax([1]);
        var scale = where(scb.gt(0), full_like(scb, 127.0f) / scb, zeros_like(scb)); // 127/0 would make 0 × inf = NaN
        var q = (w16 * scale.unsqueeze(1)).round().clamp(-127, 127).to(ScalarType.Int8);
        return new Int8Weight(q.MoveToOuterDisposeScope(), scb.MoveToOuterDisposeScope());
    }

    /// <summary>The fp32 weight (q × SCB) × fp32(1/127).</summary>
    public static Tensor Dequantize(Int8Weight q)
    {
        using var scope = NewDisposeScope();
        var w = q.Weight.to(ScalarType.Float32) * q.Scb.to(ScalarType.Float32).unsqueeze(1) * InverseOf127;
        return w.MoveToOuterDisposeScope();
    }
}
