using LoraKit.Diagnostics;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The paged-attention decode kernel of the serving engine (issue 21) against its libtorch reference over shuffled,
/// NaN-poisoned paged caches, and replayed from a CUDA graph after its block tables and lengths change in place (see
/// <see cref="PagedAttentionChecks"/>, also printed by <c>lorakit check-kernels</c>). The timing lines go to the test
/// output. GPU only.
/// </summary>
[Collection(GlobalRng.Name)]
public class PagedAttentionKernelTests(ITestOutputHelper output)
{
    [CudaFact]
    public void DecodeMatchesTheReference() => CudaTests.AssertAllPass(PagedAttentionChecks.Exactness(CUDA));

    [CudaFact]
    public void CapturedDecodeFollowsNewSeqLensAndBlockTables() => CudaTests.AssertAllPass(PagedAttentionChecks.CudaGraphReplay(CUDA));

    [CudaFact]
    public void TimingRuns()
    {
        var results = PagedAttentionChecks.Timing(CUDA);
        foreach (var r in results) output.WriteLine(r.ToString());
        CudaTests.AssertAllPass(results);
    }
}
