using LoraKit.Diagnostics;
using LoraKit.Quantization;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The quantized base's CUDA fast path (issue 20): the dequantization kernel gives the reference ops' bits for NF4/FP4
/// (double quantization on and off) and int8 into fp32/bf16/fp16, and a whole QLoRA training step on the fast path
/// (fused projections dequantizing per GEMM, checkpointed, replayed from a CUDA graph, checkpoints offloaded) matches the
/// reference modules and fp32 (<see cref="KernelChecks.TrainingStep"/>). GPU only.
/// </summary>
[Collection(GlobalRng.Name)]
public class QuantKernelTests
{
    [CudaFact]
    public void DequantizationKernelIsBitIdenticalToTheReference() => CudaTests.AssertAllPass(DequantKernelChecks.Exactness(CUDA));

    [CudaTheory]
    [InlineData("nf4")]
    [InlineData("int8")]
    public void QLoraTrainingStepMatches(string method) =>
        CudaTests.AssertAllPass(KernelChecks.TrainingStep(Fixtures.Model("llama"), Fixtures.Path_("training", "data.jsonl"), CUDA, new BnbQuantizeOptions(method)));
}
