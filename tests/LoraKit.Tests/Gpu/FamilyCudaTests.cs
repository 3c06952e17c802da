using LoraKit.Accelerated;
using LoraKit.Data;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// Every supported family on CUDA in bf16 against transformers' own bf16 logits (made on CUDA by the fixture scripts:
/// <c>logits_bf16_i</c>), and a bf16 training step with everything <see cref="TrainingAccelerator"/> offers turned on:
/// families whose block the fast modules do not compute are declined and must still train like the reference model.
/// GPU only (skipped without CUDA).
/// </summary>
[Collection(GlobalRng.Name)]
public class FamilyCudaTests
{
    // InlineData, not MemberData: tests/LoraKit.GpuTests' reflection runner reads inline rows only.
    [CudaTheory]
    [InlineData("llama")]
    [InlineData("mistral")]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    [InlineData("phi3")]
    [InlineData("phi4mini")]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void Bf16LogitsMatchTransformersOnCuda(string arch)
    {
        using var model = CausalLM.Load(Fixtures.Model(arch), ScalarType.BFloat16, CUDA);
        using var _ = no_grad();
        var texts = Fixtures.Json("reference", arch + ".json").GetProperty("texts");
        for (int i = 0; i < texts.GetArrayLength(); i++)
        {
            using var scope = NewDisposeScope();
            var ids = tensor(Fixtures.Ids(texts[i].GetProperty("input_ids")), device: CUDA).unsqueeze(0);
            var logits = model.Logits(ids, null, null)[0].to(ScalarType.Float32).cpu();
            var want = Fixtures.ReferenceTensor(arch, $"logits_bf16_{i}").to(ScalarType.Float32);
            double err = Close.RelError(logits, want);
            Assert.True(err <= 1e-2, $"{arch} text {i}: bf16 relative error {err:E2}");
        }
    }

    [CudaTheory]
    [InlineData("llama")]
    [InlineData("mistral")]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    [InlineData("phi3")]
    [InlineData("phi4mini")]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void Bf16TrainingStepWithEveryAccelerationEqualsTheReference(string arch)
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.BFloat16, CUDA));
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, TargetRegex = LoraConfig.AllLinear, InitLoraWeights = "false" }, seed: 3);
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), Tokenizer.Load(Fixtures.Model(arch)), new DataOptions());
        using var batch = Batches.Collate(samples.Take(3).ToList(), 0, CUDA);
        lm.Model.train();
        double Step()
        {
            using var scope = NewDisposeScope();
            var loss = Trainer.LossSum(lm.Model, batch, chunked: true);
            loss.backward();
            foreach (var (_, p) in lm.Parameters("a")) p.grad!.zero_();
            return loss.item<float>();
        }
        double want = Step();
        var log = TrainingAccelerator.Apply(lm, new TrainingAcceleration
        {
            FusedKernels = true, GradientCheckpointing = true, CheckpointKeepBytes = long.MaxValue, EmbeddingsOnHost = "auto", OffloadCheckpoints = "auto",
        });
        double got = Step();
        Assert.True(double.IsFinite(got) && Math.Abs(got - want) <= 1e-2 * Math.Abs(want), $"{arch}: loss {got} vs reference {want} ({string.Join("; ", log)})");
    }
}
