using LoraKit.Diagnostics;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The fused CUDA kernels and the whole fast training path against the TorchSharp path and fp32 (see
/// <see cref="KernelChecks"/>, also printed by <c>lorakit check-kernels</c>). GPU only.
/// </summary>
[Collection(GlobalRng.Name)]
public class FusedKernelTests
{
    [CudaFact]
    public void KernelsMatchTheTorchSharpPathInBf16() => CudaTests.AssertAllPass(KernelChecks.Kernels(CUDA));

    /// <summary>Eager and checkpointed steps against fp32, a CUDA graph replay against eager, offloaded checkpoints against on-device.</summary>
    [CudaTheory]
    [InlineData("llama")]
    [InlineData("mistral")]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    public void FastTrainingStepMatches(string arch) =>
        CudaTests.AssertAllPass(KernelChecks.TrainingStep(Fixtures.Model(arch), Fixtures.Path_("training", "data.jsonl"), CUDA));
}
