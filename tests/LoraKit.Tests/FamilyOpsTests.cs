using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The per-family arithmetic against independent computations: the Llama-style RMSNorm module, PyTorch's SDPA, the
/// tanh-GELU formula, transformers' documented bf16 rounding of Gemma's embedding scale. The end-to-end check against
/// transformers comes with the family modules (fixtures of scripts/fixtures/make_family_fixtures.py).
/// </summary>
public class FamilyOpsTests
{
    static Tensor Randn(int seed, params long[] shape) => randn(shape, generator: new Generator((ulong)seed));

    [Fact]
    public void WeightNormIsTheReferenceRmsNormModule()
    {
        using var _ = NewDisposeScope();
        var c = ModelConfig.Load(Fixtures.Model("llama"));
        using var lm = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        var norm = lm.model.norm;
        var x = Randn(1, 2, 5, c.HiddenSize);
        using var g = no_grad();
        Assert.True(FamilyOps.RmsNorm(x, norm.weight, c.RmsNormEps, NormKind.Weight).equal(norm.forward(x)).all().item<bool>());
    }

    [Fact]
    public void OnePlusWeightNormScalesByOnePlusWAndRoundsOnce()
    {
        using var _ = NewDisposeScope();
        var x = Randn(2, 3, 7, 64);
        var w = Randn(3, 64) * 0.3;
        // fp32: (1 + w) with the Llama form's w' = 1 + w gives the same up to fp32 rounding of 1 + w.
        var gemma = FamilyOps.RmsNorm(x, w, 1e-6, NormKind.OnePlusWeight);
        Assert.True(Close.RelError(gemma, FamilyOps.RmsNorm(x, 1 + w, 1e-6, NormKind.Weight)) <= 1e-6);
        // bf16: Gemma multiplies before casting, Llama after; the results differ (transformers PR 29402).
        var xb = x.to(ScalarType.BFloat16);
        var gemmaBf16 = FamilyOps.RmsNorm(xb, w.to(ScalarType.BFloat16), 1e-6, NormKind.OnePlusWeight);
        Assert.Equal(ScalarType.BFloat16, gemmaBf16.dtype);
        var expected = FamilyOps.RmsNorm(xb.to(ScalarType.Float32), w.to(ScalarType.BFloat16).to(ScalarType.Float32), 1e-6, NormKind.OnePlusWeight)
            .to(ScalarType.BFloat16);
        Assert.True(gemmaBf16.equal(expected).all().item<bool>());
    }

    [Fact]
    public void GeluTanhIsTheTanhApproximation()
    {
        using var _ = NewDisposeScope();
        var x = Randn(4, 1000) * 3;
        var formula = 0.5 * x * (1 + (Math.Sqrt(2 / Math.PI) * (x + 0.044715 * x.pow(3))).tanh());
        Assert.True(Close.RelError(FamilyOps.Activate(x, Activation.GeluTanh), formula) <= 1e-5);
        Assert.True(FamilyOps.Activate(x, Activation.Silu).equal(nn.functional.silu(x)).all().item<bool>());
    }

    [Fact]
    public void SoftCapBoundsAndKeepsSmallValues()
    {
        using var _ = NewDisposeScope();
        var x = tensor(new float[] { -1000, -1e-3f, 0, 1e-3f, 1000 });
        var y = FamilyOps.SoftCap(x, 30.0);
        Assert.True(y.abs().le(30).all().item<bool>());
        Assert.True(Close.RelError(y[TensorIndex.Slice(1, 4)], x[TensorIndex.Slice(1, 4)]) <= 1e-6);
        Assert.True(FamilyOps.SoftCap(x, null).equal(x).all().item<bool>());
    }

    [Fact]
    public void EmbeddingScaleIsRoundedToTheDtypeFirst()
    {
        using var _ = NewDisposeScope();
        var h = ones(2, 3, ScalarType.BFloat16);
        // transformers' Gemma comment: in bf16, sqrt(3072) = 55.4256 becomes 55.5.
        Assert.Equal(55.5f, FamilyOps.ScaleEmbedding(h, Math.Sqrt(3072))[0, 0].to(ScalarType.Float32).item<float>());
        var f = ones(2, 3);
        Assert.Equal((float)Math.Sqrt(3072), FamilyOps.ScaleEmbedding(f, Math.Sqrt(3072))[1, 2].item<float>());
    }

    [Fact]
    public void FusedProjectionsSplitInTransformersOrder()
    {
        using var _ = NewDisposeScope();
        var qkv = Randn(5, 2, 3, (4 + 2 * 2) * 8);
        var (q, k, v) = FamilyOps.SplitQkv(qkv, heads: 4, kvHeads: 2, headDim: 8);
        Assert.Equal([2L, 3, 32], q.shape);
        Assert.Equal([2L, 3, 16], v.shape);
        Assert.True(cat([q, k, v], -1).equal(qkv).all().item<bool>());
        var (gate, up) = FamilyOps.SplitGateUp(Randn(6, 2, 10));
        Assert.Equal(5, gate.shape[^1]);
        Assert.Throws<ArgumentException>(() => FamilyOps.SplitQkv(qkv, 4, 1, 8));
    }

    [Fact]
    public void EagerAttentionWithoutCapIsSdpa()
    {
        using var _ = NewDisposeScope();
        var q = Randn(7, 2, 4, 6, 8);
        var k = Randn(8, 2, 4, 9, 8);
        var v = Randn(9, 2, 4, 9, 8);
        var mask = AttentionMask.Build(6, 3, 4, tensor(new long[,] { { 0, 1, 1, 1, 1, 1, 1, 1, 1 }, { 1, 1, 1, 1, 1, 1, 1, 1, 1 } }), CPU)!;
        double scale = 1 / Math.Sqrt(24);
        var eager = FamilyOps.EagerAttention(q, k, v, mask, scale, null);
        // TorchSharp's SDPA always scales by head_dim^-½: a query pre-scaled by scale·√head_dim gives the same scores.
        var sdpa = nn.functional.scaled_dot_product_attention(q * (scale * Math.Sqrt(8)), k, v, mask, 0.0, false);
        Assert.True(Close.RelError(eager, sdpa) <= 1e-5);
        var capped = FamilyOps.EagerAttention(q, k, v, mask, scale, 0.1);
        Assert.False(capped.allclose(eager, 1e-3, 1e-3)); // a small cap changes the result
        Assert.True(capped.isfinite().all().item<bool>());
    }
}
