using LoraKit.Diagnostics;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The CPU side of the paged-attention decode kernel: its oracle (<see cref="PagedAttentionChecks.Reference"/>, which the
/// GPU check trusts) equals plain masked attention over unpaged K/V, and the kernel's host-side argument rules reject bad
/// tensors with one-line messages before any CUDA call (the device rule comes last, so CPU tensors reach every rule).
/// </summary>
[Collection(GlobalRng.Name)]
public class PagedAttentionTests
{
    const int N = 5, H = 8, KvH = 2, D = 16, Bs = 4, T = 23;

    /// <summary>Contiguous K/V [N, T, kvH, D] written into a paged cache in shuffled block order, with its tables.</summary>
    static (Tensor kc, Tensor vc, Tensor tables) Page(Tensor k, Tensor v, Random rng)
    {
        int perRow = (T + Bs - 1) / Bs, numBlocks = N * perRow + 3;
        var order = Enumerable.Range(0, numBlocks).OrderBy(_ => rng.Next()).ToArray();
        var kc = full([numBlocks, Bs, KvH, D], double.NaN, ScalarType.Float64);
        var vc = full([numBlocks, Bs, KvH, D], double.NaN, ScalarType.Float64);
        var table = new int[N * perRow];
        for (int n = 0; n < N; n++)
            for (int b = 0; b < perRow; b++)
            {
                int blk = table[n * perRow + b] = order[n * perRow + b];
                long len = Math.Min(Bs, T - b * Bs);
                kc[blk, TensorIndex.Slice(0, len)] = k[n, TensorIndex.Slice(b * Bs, b * Bs + len)];
                vc[blk, TensorIndex.Slice(0, len)] = v[n, TensorIndex.Slice(b * Bs, b * Bs + len)];
            }
        return (kc, vc, tensor(table, ScalarType.Int32).reshape(N, perRow));
    }

    /// <summary>softmax(softcap(q·kᵀ·scale) + mask)·v on unpaged tensors, keys masked outside [len − window, len).</summary>
    static Tensor Plain(Tensor q, Tensor k, Tensor v, int[] lens, double scale, double softcap, int window)
    {
        var kh = k.repeat_interleave(H / KvH, 2);                              // [N, T, H, D]
        var vh = v.repeat_interleave(H / KvH, 2);
        var scores = einsum("nhd,nthd->nht", q, kh) * scale;
        if (softcap > 0) scores = (scores / softcap).tanh() * softcap;
        var pos = arange(T).reshape(1, 1, T);
        var len = tensor(lens.Select(l => (long)l).ToArray()).reshape(N, 1, 1);
        var keep = pos.lt(len);
        if (window > 0) keep = keep.logical_and(pos.ge(len - window));
        scores = scores.masked_fill(keep.logical_not(), double.NegativeInfinity);
        return einsum("nht,nthd->nhd", scores.softmax(-1), vh);
    }

    [Theory]
    [InlineData(0.0, 0)]
    [InlineData(3.0, 0)]
    [InlineData(0.0, 6)]
    [InlineData(2.0, 9)]
    public void ReferenceEqualsPlainAttentionOverUnpagedKeys(double softcap, int window)
    {
        using var scope = NewDisposeScope();
        var rng = new Random(4);
        manual_seed(4);
        var q = randn([N, H, D], ScalarType.Float64) * 2;
        var k = randn([N, T, KvH, D], ScalarType.Float64);
        var v = randn([N, T, KvH, D], ScalarType.Float64);
        var lens = new[] { 1, Bs, 2 * Bs + 1, T, 11 };
        var (kc, vc, tables) = Page(k, v, rng);
        double scale = 1 / Math.Sqrt(D);
        var paged = PagedAttentionChecks.Reference(q, kc, vc, tables, tensor(lens, ScalarType.Int32), scale, softcap, window);
        var plain = Plain(q, k, v, lens, scale, softcap, window);
        Assert.False(paged.isnan().any().item<bool>());
        Assert.True(paged.allclose(plain, rtol: 1e-10, atol: 1e-12), $"max diff {(paged - plain).abs().max().item<double>()}");
        // The window of one key selects that key's value exactly: out[n, h] = v[n, len - 1, h / group].
        var last = PagedAttentionChecks.Reference(q, kc, vc, tables, tensor(lens, ScalarType.Int32), scale, softcap, window: 1);
        for (int n = 0; n < N; n++)
            Assert.True(last[n].eq(v[n, lens[n] - 1].repeat_interleave(H / KvH, 0)).all().item<bool>(), $"row {n}");
    }

    [Fact]
    public void ArgumentsAreCheckedBeforeAnyCudaCall()
    {
        using var scope = NewDisposeScope();
        var q = zeros([3, 8, 64], ScalarType.BFloat16);
        var kc = zeros([10, 16, 2, 64], ScalarType.BFloat16);
        var tables = zeros([3, 4], ScalarType.Int32);
        var lens = ones([3], ScalarType.Int32);
        var o = zeros([3, 8, 64], ScalarType.BFloat16);
        void Decode(Tensor? q_ = null, Tensor? k = null, Tensor? v = null, Tensor? t = null, Tensor? l = null, Tensor? out_ = null,
                    double softcap = 0, int window = 0) =>
            PagedAttentionKernel.Decode(q_ ?? q, k ?? kc, v ?? kc, t ?? tables, l ?? lens, out_ ?? o, 0.125, softcap, window);
        string Rejects(Action call, string expected)
        {
            var e = Assert.Throws<ArgumentException>(call);
            Assert.Contains(expected, e.Message);
            Assert.DoesNotContain('\n', e.Message);
            return e.Message;
        }
        Rejects(() => Decode(q_: zeros([3, 8, 64], ScalarType.Int32)), "fp32, bf16 or fp16");
        Rejects(() => Decode(q_: zeros([3, 8, 60], ScalarType.BFloat16), out_: zeros([3, 8, 60], ScalarType.BFloat16)), "multiple of 8 up to 256");
        Rejects(() => Decode(q_: zeros([24, 64], ScalarType.BFloat16)), "q must be [N, H, D]");
        Rejects(() => Decode(k: zeros([10, 16, 2, 64], ScalarType.Float16)), "share one dtype");
        Rejects(() => Decode(k: zeros([10, 12, 2, 64], ScalarType.BFloat16), v: zeros([10, 12, 2, 64], ScalarType.BFloat16)), "power of two");
        Rejects(() => Decode(k: zeros([10, 16, 3, 64], ScalarType.BFloat16), v: zeros([10, 16, 3, 64], ScalarType.BFloat16)), "multiple of kv heads");
        Rejects(() => Decode(v: zeros([11, 16, 2, 64], ScalarType.BFloat16)), "vCache");
        Rejects(() => Decode(t: zeros([3, 4], ScalarType.Int64)), "blockTables must be int32");
        Rejects(() => Decode(t: zeros([2, 4], ScalarType.Int32)), "blockTables must be int32 [N=3");
        Rejects(() => Decode(l: ones([4], ScalarType.Int32)), "seqLens must be int32 [N=3]");
        Rejects(() => Decode(out_: zeros([3, 8, 32], ScalarType.BFloat16)), "output");
        Rejects(() => Decode(k: zeros([10, 2, 16, 64], ScalarType.BFloat16).transpose(1, 2), v: zeros([10, 2, 16, 64], ScalarType.BFloat16).transpose(1, 2)), "kCache must be contiguous");
        Rejects(() => Decode(softcap: -1), "softcap");
        Rejects(() => Decode(window: -5), "window");
        Rejects(() => Decode(), "must be on q's CUDA device");       // every other rule passed
    }
}
