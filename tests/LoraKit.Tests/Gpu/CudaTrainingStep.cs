using LoraKit.Data;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The CUDA step tests' shared setup: a fixture model on CUDA with a non-zero LoRA adapter "a" (seed 3), the first three
/// training samples as one batch, and one training step that returns the loss and the adapter's gradients (then zeroed),
/// so a step before and after <c>TrainingAccelerator.Apply</c> can be compared.
/// </summary>
sealed class CudaTrainingStep : IDisposable
{
    public LoraModel Lm { get; }
    readonly Batch _batch;

    public CudaTrainingStep(string arch, ScalarType dtype, LoraConfig adapter)
    {
        Lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), dtype, CUDA));
        Lm.AddAdapter("a", adapter, seed: 3);
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), Tokenizer.Load(Fixtures.Model(arch)), new DataOptions());
        _batch = Batches.Collate(samples.Take(3).ToList(), 0, CUDA);
        Lm.Model.train();
    }

    /// <summary>Rank 4, alpha 8, non-zero B (init_lora_weights false), on the seven Llama-family projections.</summary>
    public static LoraConfig SevenProjections => new() { R = 4, LoraAlpha = 8, TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], InitLoraWeights = "false" };

    /// <summary>One forward and backward of the summed loss; returns it and the adapter's flattened gradients (on the CPU).</summary>
    public (double loss, Tensor grads) Step()
    {
        using var scope = NewDisposeScope();
        var loss = Trainer.LossSum(Lm.Model, _batch, chunked: true);
        loss.backward();
        var grads = cat(Lm.Parameters("a").Select(p => p.param.grad!.flatten()).ToArray()).cpu().DetachFromDisposeScope();
        foreach (var (_, p) in Lm.Parameters("a")) p.grad!.zero_();
        return (loss.item<float>(), grads);
    }

    public void Dispose()
    {
        _batch.Dispose();
        Lm.Dispose();
    }
}
