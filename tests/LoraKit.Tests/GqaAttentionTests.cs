using LoraKit.Runtime;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// ATen's grouped-query SDPA, bound by its C++ name, against the repeat-k/v path it replaces: same output and same
/// gradients (fp32, CPU). The explicit-scale case checks the by-value <c>std::optional&lt;double&gt;</c> of the binding's
/// ABI against attention written out by hand.
/// </summary>
[Collection(GlobalRng.Name)]
public class GqaAttentionTests
{
    static Tensor Repeat(Tensor kv, int rep)
    {
        long b = kv.shape[0], h = kv.shape[1], t = kv.shape[2], d = kv.shape[3];
        return kv.unsqueeze(2).expand(b, h, rep, t, d).reshape(b, h * rep, t, d);
    }

    [Theory]
    [InlineData(2, 8, 2, 5, 16)]
    [InlineData(1, 6, 3, 7, 8)]
    [InlineData(3, 4, 4, 4, 32)]  // no grouping: plain multi-head
    [InlineData(2, 4, 1, 9, 8)]   // multi-query
    public void MatchesRepeatedKvForwardAndBackward(int b, int h, int hkv, int t, int d)
    {
        Assert.True(GqaAttention.Available);
        manual_seed(7);
        // The model's layout: [B, T, heads, D] contiguous, attention on the [B, heads, T, D] views.
        var q0 = randn(b, t, h, d); var k0 = randn(b, t, hkv, d); var v0 = randn(b, t, hkv, d);
        var gOut = randn(b, h, t, d);
        Tensor[] Run(bool grouped)
        {
            var (q, k, v) = (q0.clone().requires_grad_(), k0.clone().requires_grad_(), v0.clone().requires_grad_());
            var (qt, kt, vt) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
            var o = grouped ? GqaAttention.Causal(qt, kt, vt)
                            : nn.functional.scaled_dot_product_attention(qt, Repeat(kt, h / hkv), Repeat(vt, h / hkv), null, 0.0, true);
            o.backward([gOut]);
            return [o.detach(), q.grad!, k.grad!, v.grad!];
        }
        var want = Run(false);
        var got = Run(true);
        string[] names = ["output", "dq", "dk", "dv"];
        for (int i = 0; i < want.Length; i++)
        {
            double rel = (got[i] - want[i]).norm().item<float>() / want[i].norm().item<float>();
            Assert.True(rel < 1e-5, $"{names[i]}: relative error {rel:e2}");
        }
    }

    [Fact]
    public void ExplicitScaleIsPassed()
    {
        manual_seed(3);
        var q = randn(1, 4, 6, 8); var k = randn(1, 2, 6, 8); var v = randn(1, 2, 6, 8);
        const double scale = 0.37;
        var kr = Repeat(k, 2); var vr = Repeat(v, 2);
        var scores = matmul(q, kr.transpose(2, 3)) * scale;
        var causal = ones(6, 6, dtype: ScalarType.Bool).tril();
        var want = matmul(scores.masked_fill(causal.logical_not(), double.NegativeInfinity).softmax(-1), vr);
        var got = GqaAttention.Causal(q, k, v, scale);
        Assert.True((got - want).abs().max().item<float>() < 1e-5);
        // and the default is 1/sqrt(D), not this scale
        Assert.True((GqaAttention.Causal(q, k, v) - want).abs().max().item<float>() > 1e-3);
    }

    [Fact]
    public void RejectsShapesTheOpWouldThrowOn()
    {
        var q = randn(1, 6, 5, 8);
        Assert.Throws<ArgumentException>(() => GqaAttention.Causal(q, randn(1, 4, 5, 8), randn(1, 4, 5, 8)));  // 6 heads, 4 kv heads
        Assert.Throws<ArgumentException>(() => GqaAttention.Causal(q, randn(1, 2, 5, 4), randn(1, 2, 5, 4)));  // head dims differ
        Assert.Throws<ArgumentException>(() => GqaAttention.Causal(q, randn(1, 2, 5, 8, dtype: ScalarType.Float64), randn(1, 2, 5, 8)));
    }
}
