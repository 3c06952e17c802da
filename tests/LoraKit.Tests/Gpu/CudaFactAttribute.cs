using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// A fact that needs a CUDA device: skipped where torch.cuda.is_available() is false (the CPU machine), run on the GPU
/// machine by scripts/gpu/run_gpu_tests.sh.
/// </summary>
public sealed class CudaFactAttribute : FactAttribute
{
    public CudaFactAttribute()
    {
        if (!cuda.is_available()) Skip = CudaTests.SkipReason;
    }
}

/// <summary>A theory that needs a CUDA device (see <see cref="CudaFactAttribute"/>).</summary>
public sealed class CudaTheoryAttribute : TheoryAttribute
{
    public CudaTheoryAttribute()
    {
        if (!cuda.is_available()) Skip = CudaTests.SkipReason;
    }
}

/// <summary>What the CUDA tests share.</summary>
public static class CudaTests
{
    public const string SkipReason = "needs CUDA: runs on the GPU machine (scripts/gpu/run_gpu_tests.sh)";

    /// <summary>Fails with every failed check's line when any check failed.</summary>
    public static void AssertAllPass(IReadOnlyList<Diagnostics.KernelChecks.Result> results)
    {
        Assert.NotEmpty(results);
        var failed = results.Where(r => !r.Pass).Select(r => r.ToString()).ToList();
        Assert.True(failed.Count == 0, string.Join("\n", failed));
    }
}
