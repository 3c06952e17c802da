using LoraKit.Accelerated;
using LoraKit.Data;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The fast training path (LoRA branch in the input's dtype, RMSNorm and SwiGLU-down with hand-written backwards) must
/// compute what the plain path computes: in fp32 on CPU the losses and every LoRA gradient agree to rounding.
/// </summary>
[Collection(GlobalRng.Name)]
public class FastTrainingTests
{
    static readonly string[] AllLinear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    [Theory]
    [InlineData("llama", false, 0.0, true, 0)]
    [InlineData("mistral", false, 0.0, true, 0)]
    [InlineData("qwen2", false, 0.0, true, 0)]   // q/k/v biases
    [InlineData("qwen3", false, 0.0, true, 0)]   // per-head q/k norms go through the fused RMSNorm too
    [InlineData("qwen2", false, 0.0, false, 0)]  // no adapter on down_proj: the fused tail without LoRA
    [InlineData("llama", false, 0.1, true, 0)]   // dropout: LoRA in input dtype with masks, the MLP tail falls back
    // Checkpointing: the fast path replays lean (o/down GEMMs skipped), keeping gate/up for none, one or all layers,
    // or whole layers with dropout.
    [InlineData("llama", true, 0.0, true, 0)]
    [InlineData("llama", true, 0.0, true, 1)]
    [InlineData("mistral", true, 0.0, true, 99)]
    [InlineData("qwen2", true, 0.0, true, 99)]
    [InlineData("qwen2", true, 0.0, false, 1)]   // down_proj a bare frozen layer
    [InlineData("qwen3", true, 0.0, true, 99)]
    [InlineData("llama", true, 0.1, true, 99)]   // dropout: whole-layer replay (masks replayed in forward order)
    public void SameLossAndGradientsAsPlainPath(string arch, bool checkpointing, double dropout, bool onDown, int keepMlpLayers)
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        string[] targets = onDown ? AllLinear : ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"];
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, LoraDropout = dropout, TargetModules = [.. targets], InitLoraWeights = "false" }, seed: 3);
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), tok, new DataOptions());
        using var batch = Batches.Collate(samples.Take(3).ToList(), 0, CPU);
        lm.Model.train();
        long perLayer = 2 * batch.InputIds.shape[0] * batch.InputIds.shape[1] * lm.Model.Config.IntermediateSize * sizeof(float);
        // The plain run is the reference model as loaded (no checkpointing: it keeps every activation); the fast run has
        // everything TrainingAccelerator swaps in.
        (double loss, List<Tensor> grads) Run(bool fast)
        {
            if (fast) TrainingAccelerator.Apply(lm, new TrainingAcceleration { FusedKernels = true, GradientCheckpointing = checkpointing, CheckpointKeepBytes = keepMlpLayers * perLayer });
            manual_seed(42);
            var loss = Trainer.LossSum(lm.Model, batch, chunked: true);
            loss.backward();
            var grads = lm.Parameters("a").Select(p => p.param.grad!.clone()).ToList();
            foreach (var (_, p) in lm.Parameters("a")) p.grad!.zero_();
            return (loss.item<float>(), grads);
        }
        long released = CustomFunctions.ReleasedOutputs;
        var (plainLoss, plainGrads) = Run(false);
        long skipped = LoraProjection.SkippedOutputs;
        var (fastLoss, fastGrads) = Run(true);
        Assert.True(CustomFunctions.ReleasedOutputs > released, "the fused functions' output caches were not released");
        bool lean = checkpointing && dropout == 0;
        int layers = lm.Model.model.layers.Count;
        // o_proj per layer (down_proj is inside SwiGluDown), plus gate and up per layer that keeps them, plus q, k and v
        // per layer that keeps them with what is left once every layer keeps gate/up
        var cfg = lm.Model.Config;
        long qkvBytes = batch.InputIds.numel() * (cfg.NumAttentionHeads + 2 * cfg.NumKeyValueHeads) * cfg.HeadDim * sizeof(float);
        long qkvLayers = keepMlpLayers < layers ? 0 : Math.Min(layers, (keepMlpLayers - layers) * perLayer / qkvBytes);
        if (lean) Assert.Equal(layers + 2 * Math.Min(keepMlpLayers, layers) + 3 * qkvLayers, LoraProjection.SkippedOutputs - skipped);
        else Assert.Equal(0, LoraProjection.SkippedOutputs - skipped);
        Assert.True(Math.Abs(fastLoss - plainLoss) <= 1e-5 * Math.Abs(plainLoss), $"loss {fastLoss} vs {plainLoss}");
        var names = lm.Parameters("a").Select(p => p.key).ToList();
        for (int i = 0; i < plainGrads.Count; i++)
            Assert.True(Close.RelError(fastGrads[i], plainGrads[i]) <= 1e-4, $"{names[i]}: {Close.RelError(fastGrads[i], plainGrads[i]):E2}");
        Assert.Contains(plainGrads, g => g.abs().sum().item<float>() > 0);
    }

    /// <summary>
    /// A family whose block the fast modules do not implement (Gemma's (1 + w) norms, GeGLU, post-norms, soft-capped
    /// attention) is declined with a line in the log: its reference modules stay, checkpointing recomputes them whole,
    /// nothing is offloaded, and loss and gradients are the reference's.
    /// </summary>
    [Theory]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void DeclinedFamiliesTrainOnTheReferenceModules(string arch)
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = [.. AllLinear], InitLoraWeights = "false" }, seed: 3);
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), tok, new DataOptions());
        using var batch = Batches.Collate(samples.Take(3).ToList(), 0, CPU);
        lm.Model.train();
        (double loss, List<Tensor> grads) Run()
        {
            var loss = Trainer.LossSum(lm.Model, batch, chunked: true);
            loss.backward();
            var grads = lm.Parameters("a").Select(p => p.param.grad!.clone()).ToList();
            foreach (var (_, p) in lm.Parameters("a")) p.grad!.zero_();
            return (loss.item<float>(), grads);
        }
        var (plainLoss, plainGrads) = Run();
        var log = TrainingAccelerator.Apply(lm, new TrainingAcceleration { FusedKernels = true, GradientCheckpointing = true, OffloadCheckpoints = "on" });
        Assert.Contains(log, l => l.Contains($"declined for {lm.Model.Config.Architecture}") && l.Contains("(1 + w) RMSNorm"));
        Assert.Contains(log, l => l.StartsWith("checkpoints stay on the device", StringComparison.Ordinal));
        var layer = lm.Model.model.layers[0];
        Assert.Equal(typeof(Attention), layer.self_attn.GetType());
        Assert.Equal(typeof(Mlp), layer.mlp.GetType());
        Assert.Equal(typeof(RmsNorm), layer.input_layernorm.GetType());
        Assert.IsType<CheckpointRunner>(lm.Model.model.Runner);
        var (fastLoss, fastGrads) = Run();
        Assert.True(Math.Abs(fastLoss - plainLoss) <= 1e-5 * Math.Abs(plainLoss), $"loss {fastLoss} vs {plainLoss}");
        for (int i = 0; i < plainGrads.Count; i++) Assert.True(Close.RelError(fastGrads[i], plainGrads[i]) <= 1e-4, $"grad {i}");
        Assert.Contains(plainGrads, g => g.abs().sum().item<float>() > 0);
    }

    /// <summary>
    /// Checkpoints offloaded between forward and backward (on CPU the copies are synchronous clones, so this checks the
    /// bookkeeping: which layer's input and mid-layer residual leave, when they are freed and fetched back) give the very
    /// same loss and gradients, over two steps (the host buffers are reused), with every layer offloaded and with the
    /// last layer kept on the device.
    /// </summary>
    [Theory]
    [InlineData("llama", 0, 1, 1, 0, 0, 4)]
    [InlineData("qwen3", 0, 3, 2, 99, 1, 6)]   // gate/up of the first layer offloaded too
    [InlineData("qwen2", 0, 1, 1, 99, 99, 8)]
    // A budget for one layer's gate/up: the last layer keeps them on the device, and the first one, whose go to host
    // memory, keeps them too (they cost no device memory)
    [InlineData("mistral", 1, 1, 1, 1, 99, 4)]
    public void OffloadedCheckpointsGiveTheSameGradients(string arch, int deviceLayers, int releaseLag, int prefetch, int keepMlpLayers, int mlpLayers,
        int restoredPerStep)
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = [.. AllLinear], InitLoraWeights = "false" }, seed: 3);
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), Tokenizer.Load(Fixtures.Model(arch)), new DataOptions());
        using var batch = Batches.Collate(samples.Take(3).ToList(), 0, CPU);
        lm.Model.train();
        TrainingAccelerator.Apply(lm, new TrainingAcceleration
        {
            FusedKernels = true, GradientCheckpointing = true, CheckpointKeepBytes = keepMlpLayers * 2 * batch.InputIds.numel() * lm.Model.Config.IntermediateSize * sizeof(float),
        });
        List<Tensor> Step()
        {
            var loss = Trainer.LossSum(lm.Model, batch, chunked: true);
            loss.backward();
            var grads = lm.Parameters("a").Select(p => p.param.grad!.clone()).Append(loss.detach().reshape(1)).ToList();
            foreach (var (_, p) in lm.Parameters("a")) p.grad!.zero_();
            return grads;
        }
        var onDevice = Step();
        Assert.Null(TrainingAccelerator.PlaceCheckpoints(lm.Model, "auto", checkpointing: true)); // auto: CUDA only
        Assert.Contains("host memory", TrainingAccelerator.PlaceCheckpoints(lm.Model, "on", checkpointing: true));
        var offload = TrainingAccelerator.Offload(lm.Model)!;
        (offload.DeviceLayers, offload.ReleaseLag, offload.PrefetchAhead, offload.MlpLayers, offload.MlpStride) = (deviceLayers, releaseLag, prefetch, mlpLayers, 1);
        for (int step = 1; step <= 2; step++)
        {
        var offloaded = Step();
            Assert.Equal(step * restoredPerStep, offload.Restored); // input and mid of each offloaded layer, gate/up where they left too
            for (int i = 0; i < onDevice.Count; i++) Assert.True(offloaded[i].equal(onDevice[i]).all().item<bool>(), $"tensor {i} differs at step {step}");
        }
        Assert.True(offload.HostBytes > 0);
        Assert.Contains(onDevice, g => g.abs().sum().item<float>() > 0);
    }

    [Fact]
    public void OffloadOptionIsAutoWithCheckpointingOnCudaAndValidated()
    {
        using var model = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        Assert.Null(TrainingAccelerator.PlaceCheckpoints(model, "off", checkpointing: true));
        Assert.Null(TrainingAccelerator.PlaceCheckpoints(model, "auto", checkpointing: true));
        Assert.Contains("none without `gradient_checkpointing`", TrainingAccelerator.PlaceCheckpoints(model, "on", checkpointing: false));
        Assert.Null(TrainingAccelerator.Offload(model)); // a refusal changes nothing
        Assert.Contains("auto, on or off", Assert.Throws<ArgumentException>(() => TrainingAccelerator.PlaceCheckpoints(model, "host", true)).Message);
        var c = new TrainConfig { Model = "m", Data = "d", OffloadCheckpoints = "yes" };
        Assert.Contains("`offload_checkpoints`", Assert.Throws<ArgumentException>(c.Validate).Message);
        // Where checkpoints wait does not change what a run computes (the copies are exact), so a resume may switch it.
        Assert.False(new TrainConfig { OffloadCheckpoints = "on" }.Identity().ContainsKey("offload_checkpoints"));
    }

    [Theory]
    [InlineData(ScalarType.Float32, 1e-5)]
    [InlineData(ScalarType.BFloat16, 1e-2)]
    public void RmsNormFunctionMatchesAutograd(ScalarType dtype, double tol)
    {
        manual_seed(7);
        using var weight = (randn(64) * 0.5 + 1).to(dtype);
        var x = (randn(3, 5, 64) * 3).to(dtype);
        var dy = randn(3, 5, 64).to(dtype);
        Tensor Plain(Tensor input)
        {
            var h = input.to(ScalarType.Float32);
            h = h * rsqrt(h.pow(2).mean([-1], keepdim: true) + 1e-6);
            return weight * h.to(dtype);
        }
        var x1 = x.detach().requires_grad_(true);
        var y1 = Plain(x1);
        y1.backward([dy]);
        var x2 = x.detach().requires_grad_(true);
        var y2 = RmsNormFunction.Apply(x2, weight, 1e-6);
        y2.backward([dy]);
        Assert.True(y2.eq(y1).all().item<bool>(), "forward must be the same arithmetic");
        Assert.True(Close.RelError(x2.grad!, x1.grad!) <= tol, $"dx {Close.RelError(x2.grad!, x1.grad!):E2}");
    }

    [Fact]
    public void RopeFunctionMatchesAutograd()
    {
        manual_seed(9);
        var q = randn(2, 5, 4, 16);
        var k = randn(2, 5, 2, 16);
        var angles = randn(2, 5, 8);
        var cos = cat([angles.cos(), angles.cos()], -1);
        var sin = cat([angles.sin(), angles.sin()], -1);
        var (dq, dk) = (randn(2, 5, 4, 16), randn(2, 5, 2, 16));
        var (q1, k1) = (q.detach().requires_grad_(true), k.detach().requires_grad_(true));
        var (yq1, yk1) = (RotaryEmbedding.Apply(q1, cos, sin), RotaryEmbedding.Apply(k1, cos, sin));
        autograd.backward([yq1, yk1], [dq, dk]);
        var (q2, k2) = (q.detach().requires_grad_(true), k.detach().requires_grad_(true));
        var (yq2, yk2) = RopeFunction.Apply(q2, k2, cos, sin);
        autograd.backward([yq2, yk2], [dq, dk]);
        Assert.True(Close.RelError(yq2, yq1) <= 1e-6 && Close.RelError(yk2, yk1) <= 1e-6);
        Assert.True(Close.RelError(q2.grad!, q1.grad!) <= 1e-6, $"dq {Close.RelError(q2.grad!, q1.grad!):E2}");
        Assert.True(Close.RelError(k2.grad!, k1.grad!) <= 1e-6, $"dk {Close.RelError(k2.grad!, k1.grad!):E2}");
    }

    [Fact]
    public void SwiGluDownMatchesAutogradWithAdapter()
    {
        manual_seed(8);
        var cfg = ModelConfig.Load(Fixtures.Model("llama"));
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ["down_proj"], InitLoraWeights = "false" }, seed: 4);
        var down = (LoraLinear)lm.Model.model.layers[0].mlp.down_proj;
        down.train();
        long inter = cfg.IntermediateSize;
        var g = randn(2, 3, inter);
        var u = randn(2, 3, inter);
        var dy = randn(2, 3, cfg.HiddenSize);
        var w = down.Adapters["a"];
        Tensor[] Grads(Func<Tensor, Tensor, Tensor> f)
        {
            var gg = g.detach().requires_grad_(true);
            var uu = u.detach().requires_grad_(true);
            f(gg, uu).backward([dy]);
            var r = new[] { gg.grad!.clone(), uu.grad!.clone(), w.A.grad!.clone(), w.B.grad!.clone() };
            w.A.grad!.zero_(); w.B.grad!.zero_();
            return r;
        }
        var plain = Grads((a, b) => down.forward(nn.functional.silu(a) * b));
        Assert.True(LoraProjection.TryResolve(down, out var baseLayer, out var lora));
        var fused = Grads((a, b) => SwiGluDown.Apply(a, b, baseLayer, lora));
        string[] names = ["gate", "up", "lora_A", "lora_B"];
        for (int i = 0; i < 4; i++) Assert.True(Close.RelError(fused[i], plain[i]) <= 1e-5, $"{names[i]}: {Close.RelError(fused[i], plain[i]):E2}");
    }
}

/// <summary>
/// The CUDA graph step (<see cref="GraphedStep"/>): its options and its eager fallback, which CPU machines exercise; the
/// replay itself is checked against eager steps on the GPU by <c>lorakit check-kernels</c>.
/// </summary>
[Collection(GlobalRng.Name)]
public class GraphedStepTests
{
    [Fact]
    public void EmbeddingsGoToHostMemoryOnlyWhenUntiedFrozenAndOnCuda()
    {
        using var untied = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        using var tied = CausalLM.Load(Fixtures.Model("qwen2"), ScalarType.Float32, CPU);
        Assert.Null(TrainingAccelerator.PlaceEmbeddings(untied, "auto", checkpointing: true)); // auto: CUDA only
        Assert.Null(TrainingAccelerator.PlaceEmbeddings(untied, "off", checkpointing: true));
        Assert.Contains("not a frozen CUDA tensor", TrainingAccelerator.PlaceEmbeddings(untied, "on", checkpointing: false));
        Assert.Contains("LM head shares them", TrainingAccelerator.PlaceEmbeddings(tied, "on", checkpointing: true));
        Assert.False(TrainingAccelerator.EmbeddingsOnHost(untied));
        Assert.Equal(TorchSharp.DeviceType.CPU, untied.model.embed_tokens.weight.device_type); // a refusal changes nothing
        Assert.Contains("auto, on or off", Assert.Throws<ArgumentException>(() => TrainingAccelerator.PlaceEmbeddings(untied, "host", true)).Message);
        var c = new TrainConfig { Model = "m", Data = "d", EmbeddingsOnHost = "yes" };
        Assert.Contains("`embeddings_on_host`", Assert.Throws<ArgumentException>(c.Validate).Message);
        // Where the table lives does not change what a run computes (the gather is exact), so a resume may switch it.
        Assert.False(new TrainConfig { EmbeddingsOnHost = "on" }.Identity().ContainsKey("embeddings_on_host"));
    }

    [Fact]
    public void CudaGraphOptionIsAutoOnCudaOnlyAndRefusedWhereItCannotWork()
    {
        Assert.False(Trainer.UseCudaGraph("auto", CPU, fastKernels: true, dropout: 0));
        Assert.False(Trainer.UseCudaGraph("off", CPU, fastKernels: true, dropout: 0));
        Assert.Contains("CUDA", Assert.Throws<ArgumentException>(() => Trainer.UseCudaGraph("on", CPU, true, 0)).Message);
        Assert.Contains("auto, on or off", Assert.Throws<ArgumentException>(() => Trainer.UseCudaGraph("always", CPU, true, 0)).Message);
        var c = new TrainConfig { Model = "m", Data = "d", CudaGraph = "yes" };
        Assert.Contains("`cuda_graph`", Assert.Throws<ArgumentException>(c.Validate).Message);
        // The option does not change what a run computes, so resuming with another value is allowed.
        Assert.False(new TrainConfig { CudaGraph = "off" }.Identity().ContainsKey("cuda_graph"));
    }

    [Fact]
    public void FallsBackToEagerStepsWhenTheStepCannotBeCaptured()
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ["q_proj", "v_proj", "down_proj"], InitLoraWeights = "false" }, seed: 3);
        TrainingAccelerator.Apply(lm, new TrainingAcceleration { FusedKernels = true });
        lm.Model.train();
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), Tokenizer.Load(Fixtures.Model("llama")), new DataOptions());
        using var batch = Batches.Collate(samples.Take(3).ToList(), 0, CPU);
        using var shorter = Batches.Collate(samples.Skip(3).Take(1).ToList(), 0, CPU);
        var ps = lm.Parameters("a");
        (double loss, Tensor grads) Run(Func<Tensor> step)
        {
            foreach (var (_, p) in ps) p.grad?.zero_();
            using var loss = step();
            return (loss.item<float>(), cat(ps.Select(p => p.param.grad!.flatten()).ToArray()));
        }
        Tensor Eager(Batch b, double scale)
        {
            var loss = Trainer.LossSum(lm.Model, b, chunked: true);
            (loss * scale).backward();
            return loss.detach();
        }
        using var step = new GraphedStep(b => Trainer.LossSum(lm.Model, b, chunked: true)) { WarmupRuns = 1 };
        var expected = Run(() => Eager(batch, 0.25));
        var other = Run(() => Eager(shorter, 0.5));
        // Warm-up, then the capture attempt (no CUDA stream here: it fails and the step stays eager), then eager again;
        // a batch of another shape in between takes the eager path too.
        foreach (var (b, scale, want) in new[] { (batch, 0.25, expected), (batch, 0.25, expected), (shorter, 0.5, other), (batch, 0.25, expected) })
        {
            var got = Run(() => step.Run(b, scale));
            Assert.Equal(want.loss, got.loss, 6);
            Assert.True(Close.RelError(got.grads, want.grads) <= 1e-6, $"grads differ ({Close.RelError(got.grads, want.grads):E2})");
        }
        Assert.Equal(0, step.Replays);
        Assert.Contains("side stream", step.Disabled);
    }
}
