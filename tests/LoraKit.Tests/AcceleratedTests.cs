using LoraKit.Accelerated;
using LoraKit.Lora;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// <see cref="TrainingAccelerator"/> swaps faster modules into a built model: the model keeps its parameters (names,
/// shapes, the very tensors) and computes what the reference model computes. The training-step equivalence (loss and
/// gradients, with checkpointing and offload) is in <see cref="FastTrainingTests"/>.
/// </summary>
[Collection(GlobalRng.Name)]
public class AcceleratedTests
{
    [Theory]
    [InlineData("llama")]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    public void ApplyKeepsTheParametersAndTheLogits(string arch)
    {
        using var reference = CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU);
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ["q_proj", "v_proj", "down_proj"], InitLoraWeights = "false" }, seed: 5);
        var before = lm.Model.named_parameters().Select(p => (p.name, p.parameter.Handle)).ToList();
        var adapterOrder = lm.Parameters("a").Select(p => p.key).ToList();
        using var ids = tensor(new long[] { 1, 5, 9, 3, 7, 2, 8, 4 }).reshape(2, 4);
        using var wantWithAdapter = lm.Model.Logits(ids, null, null).detach();

        TrainingAccelerator.Apply(lm, new TrainingAcceleration { FusedKernels = true, GradientCheckpointing = true });

        // The same tensors (shared, not copied) under the same names in the same order: an optimizer or checkpoint built
        // before the swap still pairs up.
        Assert.Equal(before, lm.Model.named_parameters().Select(p => (p.name, p.parameter.Handle)).ToList());
        Assert.Equal(adapterOrder, lm.Parameters("a").Select(p => p.key).ToList());
        var layer = lm.Model.model.layers[0];
        Assert.IsType<FastAttention>(layer.self_attn);
        Assert.IsType<FastMlp>(layer.mlp);
        Assert.IsType<FusedRmsNorm>(layer.input_layernorm);
        Assert.IsType<CheckpointRunner>(lm.Model.model.Runner);
        Assert.False(lm.Model.training); // the swapped modules keep the model's mode (eval after a load)
        Assert.False(layer.mlp.training);
        using (var _ = no_grad())
        {
            using var got = lm.Model.Logits(ids, null, null);
            Assert.True(Close.RelError(got, wantWithAdapter) <= 1e-5, $"logits with the adapter {Close.RelError(got, wantWithAdapter):E2}");
            // Training mode without grad (no checkpointing, no autograd functions): the fused modules' no-grad paths.
            lm.Model.train();
            lm.SetDisabled(true);
            using var trainMode = lm.Model.Logits(ids, null, null);
            using var plain = reference.Logits(ids, null, null);
            Assert.True(Close.RelError(trainMode, plain) <= 1e-5, $"training-mode logits {Close.RelError(trainMode, plain):E2}");
        }

        // Applying again re-decides: without the fused kernels the MLP and norms are the reference modules again.
        TrainingAccelerator.Apply(lm, new TrainingAcceleration());
        layer = lm.Model.model.layers[0];
        Assert.Equal(typeof(Mlp), layer.mlp.GetType());
        Assert.Equal(typeof(RmsNorm), layer.input_layernorm.GetType());
        Assert.Equal(typeof(RmsNorm), lm.Model.model.norm.GetType());
        Assert.Equal(PlainLayerRunner.Instance, lm.Model.model.Runner);
        Assert.True(lm.Model.training);
    }

    /// <summary>
    /// Phi-3's fused qkv_proj / gate_up_proj have no fast modules: Apply declines them with a log line, leaves the
    /// reference modules in place (checkpointing still plugs in), and the model computes what it computed before.
    /// </summary>
    [Theory]
    [InlineData("phi3")]
    [InlineData("phi4mini")]
    public void FusedProjectionFamiliesAreDeclinedAndKeepTheReferenceModules(string arch)
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, TargetRegex = LoraConfig.AllLinear, InitLoraWeights = "false" }, seed: 5);
        using var ids = tensor(new long[] { 1, 5, 9, 3, 7, 2, 8, 4 }).reshape(2, 4);
        using var want = lm.Model.Logits(ids, null, null).detach();

        var log = TrainingAccelerator.Apply(lm, new TrainingAcceleration { FusedKernels = true, GradientCheckpointing = true });

        Assert.Contains(log, l => l.Contains("declined for Phi3ForCausalLM"));
        var layer = lm.Model.model.layers[0];
        Assert.Equal(typeof(Attention), layer.self_attn.GetType());
        Assert.Equal(typeof(Mlp), layer.mlp.GetType());
        Assert.Equal(typeof(RmsNorm), layer.input_layernorm.GetType());
        Assert.IsType<CheckpointRunner>(lm.Model.model.Runner);
        using var _ = no_grad();
        using var got = lm.Model.Logits(ids, null, null);
        Assert.True(Close.RelError(got, want) <= 1e-6, $"{Close.RelError(got, want):E2}");
        Assert.Throws<ArgumentException>(() => new FastAttention(layer.self_attn, true));
        Assert.Throws<ArgumentException>(() => new FastMlp(layer.mlp));
    }

    [Fact]
    public void GroupedQueryKernelEqualsRepeatedKvHeads()
    {
        // llama's fixture has fewer kv heads than query heads: the reference repeats them, FastAttention does not.
        using var reference = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        using var fast = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        Assert.True(fast.Config.NumAttentionHeads > fast.Config.NumKeyValueHeads);
        TrainingAccelerator.Apply(fast, new TrainingAcceleration());
        using var ids = tensor(new long[] { 3, 1, 4, 1, 5, 9, 2, 6, 5, 3 }).reshape(1, 10);
        using var _ = no_grad();
        using var want = reference.Logits(ids, null, null);
        using var got = fast.Logits(ids, null, null);
        Assert.True(Close.RelError(got, want) <= 1e-5, $"{Close.RelError(got, want):E2}");
    }

    /// <summary>Models is the reference: it names neither the adapters nor the runtime nor the fast paths plugged into it.</summary>
    [Fact]
    public void ModelsKnowsNothingOfLoraRuntimeOrAccelerated()
    {
        var forbidden = new System.Text.RegularExpressions.Regex(@"\b(Lora|LoRA|Runtime|Accelerated|Cuda)\b");
        var hits = Directory.GetFiles(Path.Combine(Fixtures.Root, "src", "LoraKit", "Models"), "*.cs")
            .SelectMany(f => File.ReadLines(f).Select((line, i) => (f, i, line)))
            .Where(x => forbidden.IsMatch(x.line))
            .Select(x => $"{Path.GetFileName(x.f)}:{x.i + 1}: {x.line.Trim()}")
            .ToList();
        Assert.True(hits.Count == 0, string.Join("\n", hits));
    }
}
