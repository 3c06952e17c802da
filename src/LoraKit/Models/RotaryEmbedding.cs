using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// Rotary position embedding in transformers' "rotate_half" layout. Inverse frequencies (with Llama-3 scaling when
/// configured) are computed in fp32 exactly as transformers does; cos/sin are computed in fp32 and cast to the
/// activations' dtype.
/// </summary>
public sealed class RotaryEmbedding : IDisposable
{
    readonly Tensor _invFreq; // [head_dim / 2], fp32

    public RotaryEmbedding(ModelConfig c, Device device)
    {
        using var scope = NewDisposeScope();
        int dim = c.HeadDim;
        var exponent = arange(0, dim, 2, ScalarType.Int64).to(ScalarType.Float32) / dim;
        var inv = 1.0f / pow(c.RopeTheta, exponent);
        if (c.RopeScaling is { } s) inv = Llama3Scale(inv, s);
        _invFreq = inv.to(device, copy: true).DetachFromDisposeScope();
    }

    static Tensor Llama3Scale(Tensor invFreq, Llama3RopeScaling s)
    {
        double lowFreqWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
        double highFreqWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
        var wavelen = 2 * Math.PI / invFreq;
        // Long wavelengths are divided by the factor, short ones kept, and the band between is interpolated.
        var scaled = where(wavelen > lowFreqWavelen, invFreq / s.Factor, invFreq);
        var smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
        var smoothed = (1 - smooth) * scaled / s.Factor + smooth * scaled;
        var isMedium = (wavelen < highFreqWavelen).logical_not().logical_and((wavelen > lowFreqWavelen).logical_not());
        return where(isMedium, smoothed, scaled);
    }

    /// <summary>cos and sin for the given positions ([B, T] int64), each [B, T, head_dim] in <paramref name="dtype"/>.</summary>
    public (Tensor cos, Tensor sin) CosSin(Tensor positions, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var freqs = positions.to(ScalarType.Float32).unsqueeze(-1) * _invFreq; // [B, T, D/2]
        var emb = cat([freqs, freqs], -1);
        var cos = emb.cos().to(dtype);
        var sin = emb.sin().to(dtype);
        return (cos.MoveToOuterDisposeScope(), sin.MoveToOuterDisposeScope());
    }

    /// <summary>Applies the rotation to x of shape [B, T, H, D] with cos/sin of shape [B, T, D].</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        var c = cos.unsqueeze(2);
        var s = sin.unsqueeze(2);
        long half = x.shape[^1] / 2;
        var x1 = x[TensorIndex.Ellipsis, TensorIndex.Slice(0, half)];
        var x2 = x[TensorIndex.Ellipsis, TensorIndex.Slice(half)];
        var rotated = cat([-x2, x1], -1);
        return (x * c + rotated * s).MoveToOuterDisposeScope();
    }

    public void Dispose() => _invFreq.Dispose();
}
