using LoraKit.Accelerated;
using LoraKit.Data;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// On CUDA, the model with everything <see cref="TrainingAccelerator"/> swaps in (fused modules, the grouped-query
/// kernel, lean checkpointing, embeddings in host memory, checkpoints offloaded over the copy stream) computes the
/// reference model's loss and LoRA gradients: in fp32, where the fused functions compute the reference arithmetic.
/// GPU only; the CPU twin is <see cref="FastTrainingTests"/>.
/// </summary>
[Collection(GlobalRng.Name)]
public class AcceleratedCudaTests
{
    [CudaTheory]
    [InlineData("llama")]
    [InlineData("qwen3")]
    public void AcceleratedStepEqualsTheReference(string arch)
    {
        using var run = new CudaTrainingStep(arch, ScalarType.Float32, CudaTrainingStep.SevenProjections);
        var lm = run.Lm;
        var (wantLoss, want) = run.Step();
        var log = TrainingAccelerator.Apply(lm, new TrainingAcceleration
        {
            FusedKernels = true, GradientCheckpointing = true, CheckpointKeepBytes = long.MaxValue, EmbeddingsOnHost = "auto", OffloadCheckpoints = "on",
        });
        // Fixture models have 2 layers, which the default keeps on the device: every layer's checkpoint and gate/up leave.
        var offload = TrainingAccelerator.Offload(lm.Model)!;
        (offload.DeviceLayers, offload.ReleaseLag, offload.PrefetchAhead, offload.MlpLayers, offload.MlpStride) = (0, 1, 1, int.MaxValue, 1);
        for (int step = 0; step < 2; step++)
        {
            var (loss, grads) = run.Step();
            Assert.True(Math.Abs(loss - wantLoss) <= 1e-5 * Math.Abs(wantLoss), $"loss {loss} vs {wantLoss} ({string.Join("; ", log)})");
            Assert.True(Close.RelError(grads, want) <= 1e-4, $"grads {Close.RelError(grads, want):E2} ({string.Join("; ", log)})");
        }
        Assert.True(offload.Restored > 0, "no checkpoint was offloaded");
    }

    /// <summary>
    /// A family the fast modules do not implement (Gemma 2/3) is declined on CUDA too, with its line in the log: with
    /// everything asked for, the step runs the reference modules (checkpointed by plain recompute, nothing offloaded)
    /// and computes the reference step.
    /// </summary>
    [CudaTheory]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void DeclinedFamilyStepEqualsTheReference(string arch)
    {
        using var run = new CudaTrainingStep(arch, ScalarType.Float32, CudaTrainingStep.SevenProjections);
        var lm = run.Lm;
        var (wantLoss, want) = run.Step();
        var log = TrainingAccelerator.Apply(lm, new TrainingAcceleration
        {
            FusedKernels = true, GradientCheckpointing = true, CheckpointKeepBytes = long.MaxValue, EmbeddingsOnHost = "auto", OffloadCheckpoints = "on",
        });
        Assert.Contains(log, l => l.Contains($"declined for {lm.Model.Config.Architecture}"));
        Assert.Null(TrainingAccelerator.Offload(lm.Model));
        Assert.Equal(typeof(Attention), lm.Model.model.layers[0].self_attn.GetType());
        var (loss, grads) = run.Step();
        Assert.True(Math.Abs(loss - wantLoss) <= 1e-5 * Math.Abs(wantLoss), $"loss {loss} vs {wantLoss} ({string.Join("; ", log)})");
        Assert.True(Close.RelError(grads, want) <= 1e-4, $"grads {Close.RelError(grads, want):E2} ({string.Join("; ", log)})");
    }
}
