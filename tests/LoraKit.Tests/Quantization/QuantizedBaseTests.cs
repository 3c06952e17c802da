using System.Text.Json;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Quantization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests.Quantization;

/// <summary>
/// A quantized base in use (issue 20): quantize-on-load keeps the linear layers packed and gives the logits of the
/// same options written by <c>lorakit quantize</c> and of the reference fixture's dequantized weights; the packed layers
/// hold the packed bytes and nothing dense; training on the packed base saves a plain PEFT adapter that records the
/// quantization and reloads with identical outputs; bad flags are one-line errors.
/// </summary>
public class QuantizedBaseTests
{
    static string QuantPath(params string[] parts) => Fixtures.Path_(["reference", "quant", .. parts]);
    static string Llama => Fixtures.Model("llama");

    /// <summary>The options fixtures/reference/quant/llama-&lt;method&gt; were made with.</summary>
    static BnbQuantizeOptions FixtureOptions(string method) => method switch
    {
        "nf4" => new("nf4", true, 64, "float32"),
        "fp4" => new("fp4", false, 128, "float32"),
        _ => new("int8", false, 64, "float32"),
    };

    static Tensor Logits(CausalLM model, Tensor ids)
    {
        using var _ = no_grad();
        return model.Logits(ids, null, null)[0];
    }

    [Theory]
    [InlineData("nf4")]
    [InlineData("fp4")]
    [InlineData("int8")]
    public void QuantizeOnLoadEqualsTheWrittenCheckpointAndTheReference(string method)
    {
        using var scope = NewDisposeScope();
        using var refs = SafetensorsFile.Open(QuantPath("llama-logits.safetensors"));
        var ids = refs.Read("input_ids").unsqueeze(0);
        using var onLoad = CausalLM.Load(Llama, ScalarType.Float32, CPU, FixtureOptions(method));
        var dir = Path.Combine(Fixtures.TempDir(), "q-" + method);
        CheckpointQuantizer.Quantize(Llama, dir, FixtureOptions(method));
        using var written = CausalLM.Load(dir, ScalarType.Float32, CPU);
        var a = Logits(onLoad, ids);
        Assert.True(a.eq(Logits(written, ids)).all().item<bool>(), $"{method}: quantize-on-load and the written checkpoint differ");
        double rel = Close.RelError(a, refs.Read("logits_" + method));
        Assert.True(rel <= 1e-4, $"{method}: logits relative error {rel:E2} vs the dequantized reference");
        Assert.Equal(FixtureOptions(method).Method, onLoad.Quantization!.Method);
        Assert.True(onLoad.model.layers[0].self_attn.q_proj is Linear { IsQuantized: true });
        Assert.False(onLoad.lm_head.IsQuantized); // the LM head and embeddings stay dense
    }

    [Fact]
    public void PackedLayersHoldThePackedBytesAndNoDenseCopy()
    {
        using var model = CausalLM.Load(Llama, ScalarType.Float32, CPU, new BnbQuantizeOptions("nf4", true, 64));
        var layers = model.modules().OfType<Linear>().Where(l => l.IsQuantized).ToList();
        Assert.Equal(14, layers.Count); // 7 projections × 2 layers
        foreach (var l in layers)
        {
            Assert.Empty(l.parameters()); // no dense weight (and no bias in Llama)
            long n = l.OutFeatures * l.InFeatures, blocks = (n + 63) / 64, nested = (blocks + 255) / 256;
            long expected = (n + 1) / 2 + blocks /* uint8 absmax codes */ + 16 * 4 + nested * 4 + 256 * 4;
            Assert.Equal(expected, l.Packed!.StorageBytes);
            Assert.Throws<InvalidOperationException>(() => l.weight);
        }
        // Every dense parameter left is an embedding, a norm or the LM head.
        Assert.All(model.named_parameters(), p => Assert.Matches("embed_tokens|norm|lm_head", p.name));
    }

    [Fact]
    public void PreQuantizedCheckpointRefusesOtherOptionsAndAcceptsItsOwn()
    {
        var e = Assert.Throws<LoraKitException>(() => CausalLM.Load(QuantPath("llama-nf4"), ScalarType.Float32, CPU, new BnbQuantizeOptions("fp4")));
        Assert.Contains("already quantized (nf4, blocksize 64, double quantization on)", e.Message);
        using var same = CausalLM.Load(QuantPath("llama-nf4"), ScalarType.Float32, CPU, new BnbQuantizeOptions("nf4", true, 64));
        Assert.Equal("nf4", same.Quantization!.Method);
    }

    [Fact]
    public void TrainingOnAQuantizedBaseSavesAPlainAdapterThatRecordsItAndReloadsIdentically()
    {
        var q = new BnbQuantizeOptions("nf4", true, 64);
        var examples = File.ReadAllLines(Fixtures.Path_("training", "data.jsonl"))
            .Select(l => TrainingExample.FromText(JsonDocument.Parse(l).RootElement.GetProperty("text").GetString()!)).ToList();
        using var lm = LoraKitModel.FromPretrained(Llama, "cpu", "fp32", q);
        double baseLoss = lm.Loss("reset my password");
        using var trainer = lm.CreateTrainer(examples, new LoraConfig { R = 4, LoraAlpha = 8 },
            new TrainConfig { Lr = 2e-2, Steps = 3, BatchSize = 2, Schedule = "constant", LoraDropout = 0 });
        for (int i = 0; i < 3; i++) Assert.True(double.IsFinite(trainer.Step()));
        double trained = lm.Loss("reset my password");
        Assert.NotEqual(baseLoss, trained);
        var dir = Path.Combine(Fixtures.TempDir(), "adapter");
        trainer.Save(dir);

        using (var f = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors")))
        {
            Assert.True(f.Metadata.TryGetValue(BnbQuantizeOptions.AdapterMetadataKey, out var json), "no lorakit_quantization metadata");
            Assert.Equal(q with { ComputeDtype = "float32" }, BnbQuantizeOptions.FromJson(json!, "test"));
            Assert.Equal(BaseFingerprint.Of(Llama), f.Metadata[BaseFingerprint.MetadataKey]); // the original checkpoint's
            Assert.All(f.Entries.Keys, k => Assert.Matches(@"^base_model\.model\..*\.lora_[AB]\.weight$", k)); // plain PEFT keys
        }
        using var reloaded = LoraKitModel.FromPretrained(Llama, "cpu", "fp32", q).WithAdapter(dir);
        Assert.Equal(trained, reloaded.Loss("reset my password"), 10);
    }

    [Fact]
    public void RandomInitQuantizedBuildsEveryProjectionPackedAndTheHeadDense()
    {
        // The benchmark's 70B path: weights drawn and quantized one at a time, the model never whole in 16 bits.
        using var model = CausalLM.RandomInit(ModelConfig.Load(Llama), ScalarType.Float32, CPU, new BnbQuantizeOptions("nf4"));
        var linears = model.modules().OfType<Linear>().ToList();
        Assert.Equal(14, linears.Count(l => l.IsQuantized));
        Assert.False(model.lm_head.IsQuantized);
        Assert.Equal("nf4", model.Quantization!.Method);
        Assert.Equal("float32", model.Quantization.ComputeDtype);
        using var ids = tensor(new long[] { 1, 2, 3 }).reshape(1, 3);
        using var logits = model.forward(ids);
        Assert.True(logits.isfinite().all().item<bool>());
    }

    [Fact]
    public void FastTrainingPathsOnAQuantizedBaseEqualTheReferenceModules()
    {
        // The fused projections (LoraProjection, SwiGluDown, the lean checkpoint replay) dequantize each packed W per
        // GEMM instead of reading a dense parameter: the same numbers as the reference modules, losses and gradients.
        var q = new BnbQuantizeOptions("nf4");
        double[] Run(bool fast, out Dictionary<string, Tensor> grads)
        {
            using var model = CausalLM.Load(Llama, ScalarType.Float32, CPU, q);
            using var lm = new LoraModel(model);
            lm.AddAdapter("t", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] });
            using var gen = new Generator(7);
            using (no_grad()) foreach (var (_, p) in lm.Parameters("t")) p.normal_(0, 0.05, generator: gen);
            var log = Accelerated.TrainingAccelerator.Apply(lm, new Accelerated.TrainingAcceleration { FusedKernels = fast, GradientCheckpointing = fast });
            Assert.DoesNotContain(log, l => l.Contains("declined"));
            model.train();
            using var ids = tensor(new long[] { 0, 5, 9, 17, 33, 2, 7, 11, 3, 4 }).reshape(2, 5);
            using var logits = model.forward(ids);
            using var loss = logits.pow(2).mean();
            loss.backward();
            grads = lm.Parameters("t").ToDictionary(p => p.key, p => p.param.grad!.clone());
            return [loss.item<float>()];
        }
        var reference = Run(false, out var g0);
        var fast = Run(true, out var g1);
        Assert.Equal(reference[0], fast[0], 5);
        foreach (var (key, g) in g0) Assert.True(Close.RelError(g1[key], g) <= 1e-4, $"{key}: {Close.RelError(g1[key], g):E2}");
        using var model = CausalLM.Load(Llama, ScalarType.Float32, CPU, q);
        Assert.Throws<LoraKitException>(() => CheckpointWriter.Save(model, Llama, Path.Combine(Fixtures.TempDir(), "out")));
    }

    [Fact]
    public void QuantizeCommandWritesTheReferenceCodesAndRefusesAForeignOutput()
    {
        var dir = Path.Combine(Fixtures.TempDir(), "nf4");
        var (code, stdout, stderr) = CliTests.RunCli("quantize", "--model", Llama, "--method", "nf4", "--output", dir);
        Assert.True(code == 0, stderr);
        Assert.Contains("14 linear weights", stdout);
        using (var ours = CheckpointFiles.Open(dir))
        using (var theirs = CheckpointFiles.Open(QuantPath("llama-nf4")))
        {
            Assert.Equal(theirs.Names.Order(StringComparer.Ordinal), ours.Names.Order(StringComparer.Ordinal));
            foreach (var name in BnbCheckpoint.QuantizedWeights(theirs))
            {
                using var a = ours.ReadStored(name);
                using var b = theirs.ReadStored(name);
                Assert.True(QuantFormatTests.Same(a, b), $"{name}: packed codes differ from the reference");
            }
        }
        // The output round-trips: LoraKit loads it packed with the dequantized reference's logits.
        using (var model = CausalLM.Load(dir, ScalarType.Float32, CPU))
        using (var refs = SafetensorsFile.Open(QuantPath("llama-logits.safetensors")))
        {
            using var scope = NewDisposeScope();
            Assert.True(Close.RelError(Logits(model, refs.Read("input_ids").unsqueeze(0)), refs.Read("logits_nf4")) <= 1e-4);
        }
        var again = CliTests.RunCli("quantize", "--model", Llama, "--method", "nf4", "--output", dir);
        Assert.Equal(1, again.code);
        Assert.Contains("exists and is not empty", again.stderr);
    }

    [Theory]
    [InlineData("--quantize nf5", "--quantize must be nf4, fp4 or int8, not 'nf5'")]
    [InlineData("--quantize nf4 --double-quant maybe", "--double-quant must be on or off, not 'maybe'")]
    [InlineData("--quantize nf4 --quant-blocksize 100", "--quant-blocksize must be one of 32, 64")]
    [InlineData("--quant-blocksize 128", "--double-quant and --quant-blocksize apply only with --quantize")]
    public void BadFlagsAreOneLineErrors(string flags, string message)
    {
        var (code, _, stderr) = CliTests.RunCli(["score", "--model", Llama, "--text", "hi", "--device", "cpu", .. flags.Split(' ')]);
        Assert.Equal(1, code);
        Assert.Contains(message, stderr);
        Assert.Single(stderr.Trim().Split('\n'));
    }

    [Fact]
    public void BadTrainSettingIsAOneLineError()
    {
        var (code, _, stderr) = CliTests.RunCli("train", "--model", Llama, "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", Path.Combine(Fixtures.TempDir(), "run"), "--quantize", "q3", "--registry", Path.Combine(Fixtures.TempDir(), "reg"));
        Assert.Equal(1, code);
        Assert.Contains("must be nf4, fp4 or int8, not 'q3'", stderr);
        Assert.Single(stderr.Trim().Split('\n'));
    }
}
