using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// Rotary position embedding in transformers' "rotate_half" layout, one table per layer type (<see cref="ModelConfig.Rope"/>:
/// Gemma 3's sliding layers have their own base). Inverse frequencies are computed in fp32 exactly as transformers'
/// rope init functions do (default, linear, llama3, longrope); cos/sin are computed in fp32, multiplied by the attention
/// factor (longrope) and cast to the activations' dtype. Partial rotary (Phi-4-mini): the tables cover the first
/// rotary_dim dimensions of a head and <see cref="Apply"/> passes the rest through.
/// </summary>
public sealed class RotaryEmbedding : IDisposable
{
    /// <summary>One layer type's frequencies: LongRoPE keeps a short and a long set, the others one.</summary>
    sealed class Table(Tensor invFreq, Tensor? longInvFreq, LongRopeScaling? longRope) : IDisposable
    {
        public Tensor InvFreq => invFreq;
        public Tensor? LongInvFreq => longInvFreq;
        public LongRopeScaling? LongRope => longRope;

        public void Dispose()
        {
            invFreq.Dispose();
            longInvFreq?.Dispose();
        }
    }

    readonly Dictionary<string, Table> _byType = new();
    readonly List<Table> _tables = new();

    public RotaryEmbedding(ModelConfig c, Device device)
    {
        var built = new Dictionary<RopeConfig, Table>(ReferenceEqualityComparer.Instance);
        foreach (var (type, rope) in c.Rope)
        {
            if (!built.TryGetValue(rope, out var table))
            {
                built[rope] = table = Build(rope, device);
                _tables.Add(table);
            }
            _byType[type] = table;
        }
    }

    static Table Build(RopeConfig rope, Device device)
    {
        using var scope = NewDisposeScope();
        int dim = rope.RotaryDim;
        var exponent = ScalarOps.Range(0, dim, 2, ScalarType.Int64).to(ScalarType.Float32).DividedBy(dim);
        Tensor inv, longInv = null!;
        switch (rope.Scaling)
        {
            case LongRopeScaling s:
                // transformers: 1 / (factors · base^(2i/d)), the factors chosen per forward (see CosSin).
                var powers = pow(rope.Theta, exponent);
                inv = (tensor(s.ShortFactor.Select(x => (float)x).ToArray()) * powers).reciprocal();
                longInv = (tensor(s.LongFactor.Select(x => (float)x).ToArray()) * powers).reciprocal();
                break;
            case LinearRopeScaling s:
                inv = pow(rope.Theta, exponent).reciprocal().DividedBy(s.Factor);
                break;
            case Llama3RopeScaling s:
                inv = Llama3Scale(pow(rope.Theta, exponent).reciprocal(), s);
                break;
            default:
                inv = pow(rope.Theta, exponent).reciprocal();
                break;
        }
        var longRope = rope.Scaling as LongRopeScaling;
        return new Table(inv.to(device, copy: true).DetachFromDisposeScope(),
            longRope is null ? null : longInv.to(device, copy: true).DetachFromDisposeScope(), longRope);
    }

    static Tensor Llama3Scale(Tensor invFreq, Llama3RopeScaling s)
    {
        double lowFreqWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
        double highFreqWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
        var wavelen = ScalarOps.FullLike(invFreq, 2 * Math.PI, invFreq.dtype).div(invFreq);
        // Long wavelengths are divided by the factor, short ones kept, and the band between is interpolated.
        var scaled = where(wavelen.GreaterThan(lowFreqWavelen), invFreq.DividedBy(s.Factor), invFreq);
        var smooth = ScalarOps.FullLike(wavelen, s.OriginalMaxPositionEmbeddings, wavelen.dtype).div(wavelen).Minus(s.LowFreqFactor).DividedBy(s.HighFreqFactor - s.LowFreqFactor);
        var smoothed = ScalarOps.Subtract(1, smooth).mul(scaled).DividedBy(s.Factor).Plus(smooth * scaled);
        var isMedium = wavelen.LessThan(highFreqWavelen).logical_not().logical_and(wavelen.GreaterThan(lowFreqWavelen).logical_not());
        return where(isMedium, smoothed, scaled);
    }

    /// <summary>
    /// The inverse frequencies [rotary_dim / 2] (fp32) of a layer type; <paramref name="long"/> picks LongRoPE's long set.
    /// A view of the table: do not dispose.
    /// </summary>
    public Tensor InvFreq(string layerType = ModelConfig.FullAttention, bool @long = false)
    {
        var t = TableOf(layerType);
        return @long ? t.LongInvFreq ?? throw new InvalidOperationException($"the {layerType} RoPE has no long factors") : t.InvFreq;
    }

    /// <summary>
    /// cos and sin for the given positions ([B, T] int64), each [B, T, rotary_dim] in <paramref name="dtype"/>.
    /// LongRoPE: the long factors when the largest position + 1 exceeds original_max_position_embeddings (transformers'
    /// dynamic update decides per forward call, for the whole batch), and cos/sin scaled by the attention factor.
    /// </summary>
    public (Tensor cos, Tensor sin) CosSin(Tensor positions, ScalarType dtype, string layerType = ModelConfig.FullAttention)
    {
        using var scope = NewDisposeScope();
        var table = TableOf(layerType);
        var inv = table.InvFreq;
        double attention = 1.0;
        if (table.LongRope is { } lr)
        {
            if (positions.numel() > 0 && positions.max().item<long>() + 1 > lr.OriginalMaxPositionEmbeddings) inv = table.LongInvFreq!;
            attention = lr.AttentionFactor;
        }
        var freqs = positions.to(ScalarType.Float32).unsqueeze(-1) * inv; // [B, T, D/2]
        var emb = cat([freqs, freqs], -1);
        var cos = emb.cos();
        var sin = emb.sin();
        if (attention != 1.0) { cos = cos.Times(attention); sin = sin.Times(attention); }
        return (cos.to(dtype).MoveToOuterDisposeScope(), sin.to(dtype).MoveToOuterDisposeScope());
    }

    Table TableOf(string layerType) =>
        _byType.TryGetValue(layerType, out var t) ? t : throw new ArgumentException($"no RoPE for layer type '{layerType}'", nameof(layerType));

    /// <summary>
    /// Applies the rotation to x of shape [B, T, H, D] with cos/sin of shape [B, T, R]: the first R dimensions of each
    /// head rotate (R = D unless partial rotary), the remaining D − R pass through unchanged, as transformers' Phi-3 does.
    /// </summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        long rotary = cos.shape[^1];
        if (rotary == x.shape[^1]) return Rotate(x, cos, sin).MoveToOuterDisposeScope();
        var rot = x[TensorIndex.Ellipsis, TensorIndex.Slice(0, rotary)];
        var pass = x[TensorIndex.Ellipsis, TensorIndex.Slice(rotary)];
        return cat([Rotate(rot, cos, sin), pass], -1).MoveToOuterDisposeScope();
    }

    static Tensor Rotate(Tensor x, Tensor cos, Tensor sin)
    {
        var c = cos.unsqueeze(2);
        var s = sin.unsqueeze(2);
        long half = x.shape[^1] / 2;
        var x1 = x[TensorIndex.Ellipsis, TensorIndex.Slice(0, half)];
        var x2 = x[TensorIndex.Ellipsis, TensorIndex.Slice(half)];
        var rotated = cat([-x2, x1], -1);
        return (x * c).Plus(rotated * s);
    }

    public void Dispose()
    {
        foreach (var t in _tables) t.Dispose();
    }
}
