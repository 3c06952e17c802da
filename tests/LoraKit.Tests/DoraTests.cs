using System.Text.Json.Nodes;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// A fact that runs once its fixture files exist and is skipped (saying what makes them) until then: the PEFT DoRA
/// references are made by scripts/fixtures/make_dora_fixtures.py on the GPU machine.
/// </summary>
public sealed class FixtureFactAttribute : FactAttribute
{
    /// <summary>Skipped unless every fixture path (relative to fixtures/) exists.</summary>
    public FixtureFactAttribute(params string[] paths)
    {
        if (paths.FirstOrDefault(p => !File.Exists(Fixtures.Path_(p)) && !Directory.Exists(Fixtures.Path_(p))) is { } missing)
            Skip = $"fixtures/{missing} missing: run python3 scripts/fixtures/make_dora_fixtures.py fixtures fixtures";
    }
}

/// <summary>
/// DoRA (use_dora: true) as PEFT computes it: PEFT-made adapters give PEFT's logits (alone and in a padded batch), merge
/// and unmerge as PEFT does, save/load with lora_magnitude_vector keys, train along PEFT's AdamW trajectory, and PEFT
/// loads a LoraKit-trained one. Without the PEFT fixtures the invariants below still hold (fresh adapter = base, merge
/// invariant, safe merge, PEFT parameter names, round trip, fast path declines, per-row serving).
/// </summary>
[Collection(GlobalRng.Name)]
public class DoraTests
{
    static readonly string[] AllLinear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    static LoraModel Base(string arch) => new(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));

    static string Reference(string arch) => $"peft_{arch}_dora";

    static long[] Ids(string reference, int text) =>
        Fixtures.Ids(Fixtures.Json("reference", reference + ".json").GetProperty("texts")[text].GetProperty("input_ids"));

    static readonly long[] Sample = [1, 5, 9, 77, 3, 41, 12];

    static Tensor Logits(LoraModel lm, long[] ids)
    {
        using var _ = no_grad();
        return lm.Model.Logits(tensor(ids).unsqueeze(0), null, null)[0];
    }

    static void AssertClose(Tensor actual, Tensor expected, string what, double tol = 1e-4)
    {
        double rel = Close.RelError(actual, expected);
        Assert.True(rel <= tol, $"{what}: relative error {rel:E2} > {tol:E0}");
    }

    /// <summary>A DoRA adapter with random A, B (init false) and a magnitude moved off its init, so every term acts.</summary>
    static LoraModel WithRandomDora(string arch, string name = "default", bool dora = true)
    {
        var lm = Base(arch);
        lm.AddAdapter(name, new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = AllLinear, InitLoraWeights = "false", UseDora = dora }, seed: 7);
        if (dora)
        {
            var gen = new Generator(11);
            using var _ = no_grad();
            foreach (var (_, p) in lm.Parameters(name).Where(p => p.key.EndsWith(DoraVariant.MagnitudeSuffix)))
                p.mul_(1 + 0.2 * randn(p.shape, generator: gen));
        }
        return lm;
    }

    // ---- against PEFT (fixtures from make_dora_fixtures.py) ----

    [FixtureFact("adapters/llama/dora", "reference/peft_llama_dora.safetensors")]
    public void PeftDoraAdapterGivesPeftLogitsLlama() => PeftDoraAdapterGivesPeftLogits("llama");

    [FixtureFact("adapters/qwen2/dora", "reference/peft_qwen2_dora.safetensors")]
    public void PeftDoraAdapterGivesPeftLogitsQwen2() => PeftDoraAdapterGivesPeftLogits("qwen2"); // q/k/v biases

    static void PeftDoraAdapterGivesPeftLogits(string arch)
    {
        using var lm = Base(arch);
        var cfg = AdapterFiles.Load(lm, "dora", Fixtures.Path_("adapters", arch, "dora"));
        Assert.True(cfg.UseDora);
        for (int i = 0; i < 2; i++)
        {
            var logits = Logits(lm, Ids(Reference(arch), i));
            AssertClose(logits, Fixtures.ReferenceTensor(Reference(arch), $"dora_{i}"), $"{arch} DoRA text {i}");
            Assert.True(Close.RelError(logits, Fixtures.ReferenceTensor(Reference(arch), $"base_{i}")) > 1e-3, "the adapter must change the logits");
        }
        // A right-padded batch: every real position matches PEFT's.
        var padded = Fixtures.Json("reference", Reference(arch) + ".json").GetProperty("padded");
        var ids = stack(padded.GetProperty("input_ids").EnumerateArray().Select(r => tensor(Fixtures.Ids(r))).ToArray());
        var mask = stack(padded.GetProperty("attention_mask").EnumerateArray().Select(r => tensor(Fixtures.Ids(r))).ToArray());
        Tensor batch;
        using (var _ = no_grad()) batch = lm.Model.Logits(ids, mask, null);
        var expected = Fixtures.ReferenceTensor(Reference(arch), "dora_padded");
        for (int row = 0; row < ids.shape[0]; row++)
        {
            long n = mask[row].sum().item<long>();
            AssertClose(batch[row, ..(int)n], expected[row, ..(int)n], $"{arch} padded row {row}");
        }
    }

    [FixtureFact("adapters/qwen2/dora", "reference/peft_qwen2_dora.safetensors")]
    public void MergeAndUnmergeMatchPeft()
    {
        using var lm = Base("qwen2");
        AdapterFiles.Load(lm, "dora", Fixtures.Path_("adapters", "qwen2", "dora"));
        var baseWeights = lm.BaseParameters().ToDictionary(p => p.name, p => p.param.clone());
        lm.Merge("dora");
        for (int i = 0; i < 2; i++)
            AssertClose(Logits(lm, Ids(Reference("qwen2"), i)), Fixtures.ReferenceTensor(Reference("qwen2"), $"merged_dora_{i}"), $"merged text {i}");
        lm.UnmergeAll();
        foreach (var (name, p) in lm.BaseParameters())
            Assert.True(Close.RelError(p, baseWeights[name]) <= 1e-6, $"{name} not restored by unmerge");
        for (int i = 0; i < 2; i++)
            AssertClose(Logits(lm, Ids(Reference("qwen2"), i)), Fixtures.ReferenceTensor(Reference("qwen2"), $"unmerged_dora_{i}"), $"unmerged text {i}");
    }

    [FixtureFact("adapters/qwen2/dora", "reference/peft_qwen2_dora.safetensors")]
    public void MergedDoraExportLoadsAsAPlainCheckpointWithPeftMergedLogits()
    {
        using var lm = Base("qwen2");
        AdapterFiles.Load(lm, "dora", Fixtures.Path_("adapters", "qwen2", "dora"));
        lm.Merge("dora");
        var outDir = Path.Combine(Fixtures.TempDir(), "merged");
        MergedCheckpoint.Save(lm, Fixtures.Model("qwen2"), outDir);
        using var merged = CausalLM.Load(outDir, ScalarType.Float32, CPU); // strict loader: no adapter keys may leak into it
        using var _ = no_grad();
        var logits = merged.Logits(tensor(Ids(Reference("qwen2"), 0)).unsqueeze(0), null, null)[0];
        AssertClose(logits, Fixtures.ReferenceTensor(Reference("qwen2"), "merged_dora_0"), "exported merged DoRA checkpoint");
    }

    [FixtureFact("adapters/llama/dora")]
    public void PeftDoraFileRoundTripsBitIdentically()
    {
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "dora", Fixtures.Path_("adapters", "llama", "dora"));
        var dir = Fixtures.TempDir();
        AdapterFiles.Save(lm, "dora", dir);
        using var original = SafetensorsFile.Open(Path.Combine(Fixtures.Path_("adapters", "llama", "dora"), AdapterFiles.WeightsFile));
        using var saved = SafetensorsFile.Open(Path.Combine(dir, AdapterFiles.WeightsFile));
        Assert.Equal(original.Entries.Keys.Order(), saved.Entries.Keys.Order());
        Assert.Contains(saved.Entries.Keys, k => k.EndsWith(".lora_magnitude_vector", StringComparison.Ordinal));
        foreach (var k in original.Entries.Keys) Assert.True(original.Read(k).eq(saved.Read(k)).all().item<bool>(), k);
        Assert.True(LoraConfig.Load(dir).UseDora);
    }

    [FixtureFact("adapters/llama/dora", "training/llama_dora_trajectory.json", "training/llama_dora_trajectory_final.safetensors")]
    public void ReproducesPeftDoraAdamWTrajectory()
    {
        // The LoRA trajectory test's command, from the PEFT DoRA adapter: the magnitude trains along with A and B.
        var output = Path.Combine(Fixtures.TempDir(), "peft-dora-trajectory");
        var (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", output, "--init-adapter", Fixtures.Path_("adapters", "llama", "dora"), "--lr", "1e-3", "--batch-size", "2", "--steps", "3",
            "--schedule", "constant", "--warmup-steps", "0", "--weight-decay", "0", "--max-grad-norm", "0", "--no-shuffle", "--no-eos",
            "--train-on-all-tokens", "--seed", "0", "--device", "cpu");
        Assert.True(code == 0, stderr);
        var expected = Fixtures.Json("training", "llama_dora_trajectory.json").GetProperty("losses").EnumerateArray().Select(x => x.GetDouble()).ToArray();
        var losses = File.ReadLines(Path.Combine(output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).Where(n => n["loss"] != null)
            .Select(n => n["loss"]!.GetValue<double>()).ToArray();
        Assert.Equal(expected.Length, losses.Length);
        for (int i = 0; i < expected.Length; i++) Assert.True(Math.Abs(losses[i] - expected[i]) <= 1e-4, $"step {i + 1}: {losses[i]} vs PEFT {expected[i]}");
        using var peftFinal = SafetensorsFile.Open(Fixtures.Path_("training", "llama_dora_trajectory_final.safetensors"));
        using var mine = SafetensorsFile.Open(Path.Combine(output, "adapter", AdapterFiles.WeightsFile));
        Assert.Contains(mine.Entries.Keys, k => k.EndsWith(".lora_magnitude_vector", StringComparison.Ordinal));
        foreach (var key in mine.Entries.Keys)
        {
            // PEFT's parameter names: ….lora_A.default.weight, ….lora_magnitude_vector.default.weight
            var peftKey = key.EndsWith(".lora_magnitude_vector", StringComparison.Ordinal) ? key + ".default.weight"
                : key.Replace(".lora_A.weight", ".lora_A.default.weight").Replace(".lora_B.weight", ".lora_B.default.weight");
            Assert.True(Close.RelError(mine.Read(key), peftFinal.Read(peftKey)) <= 1e-4, key);
        }
    }

    [FixtureFact("adapters/llama/dora_lorakit", "reference/peft_llama_dora_lorakit.safetensors")]
    public void PeftLoadsALoraKitTrainedDoraAdapter()
    {
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "mine", Fixtures.Path_("adapters", "llama", "dora_lorakit"));
        for (int i = 0; i < 2; i++)
            AssertClose(Logits(lm, Ids("peft_llama_dora_lorakit", i)), Fixtures.ReferenceTensor("peft_llama_dora_lorakit", $"dora_lorakit_{i}"), $"text {i}");
    }

    // ---- invariants (no PEFT fixture needed) ----

    [Fact]
    public void FreshDoraAdapterLeavesOutputsUnchangedAndStartsAtTheWeightNorm()
    {
        using var lm = Base("qwen2");
        var before = Logits(lm, Sample);
        lm.AddAdapter("fresh", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = AllLinear, UseDora = true }, seed: 3);
        AssertClose(Logits(lm, Sample), before, "fresh DoRA adapter", 1e-6);
        var q = (LoraLinear)lm.Model.model.layers[0].self_attn.q_proj!;
        // B = 0 at init, so m = ‖W‖ per output row.
        AssertClose(q.Adapters["fresh"].Magnitude!, linalg.vector_norm(q.base_layer.weight, 2, [1]), "initial magnitude", 1e-6);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void MergeInvariantBaseAdapterMergedUnmerged(bool dora)
    {
        using var lm = WithRandomDora("qwen2", "x", dora);
        var baseLogits = Logits(lm, Sample);
        lm.SetDisabled(true);
        baseLogits = Logits(lm, Sample);
        lm.SetDisabled(false);
        var withAdapter = Logits(lm, Sample);
        var baseWeights = lm.BaseParameters().ToDictionary(p => p.name, p => p.param.clone());
        lm.Merge("x");
        var merged = Logits(lm, Sample);
        AssertClose(merged, withAdapter, "merged vs adapter");
        Assert.True(Close.RelError(merged, baseLogits) > 1e-3, "merged must differ from base");
        lm.UnmergeAll();
        foreach (var (name, p) in lm.BaseParameters())
            Assert.True(Close.RelError(p, baseWeights[name]) <= 1e-6, $"{name} not restored by unmerge");
        AssertClose(Logits(lm, Sample), withAdapter, "unmerged");
    }

    [Fact]
    public void SafeMergeRefusesNonFiniteMagnitudeAndChangesNothing()
    {
        using var lm = WithRandomDora("llama");
        var (key, m) = lm.Parameters("default").First(p => p.key.EndsWith(DoraVariant.MagnitudeSuffix));
        using (var _ = no_grad()) m[0] = float.NaN;
        var before = lm.BaseParameters().ToDictionary(p => p.name, p => p.param.clone());
        var ex = Assert.Throws<InvalidOperationException>(() => lm.Merge("default"));
        Assert.Contains("non-finite", ex.Message);
        foreach (var (name, p) in lm.BaseParameters()) Assert.True(p.eq(before[name]).all().item<bool>(), name);
        Assert.All(lm.LoraLayers(), l => Assert.Empty(l.layer.Merged));
    }

    [Fact]
    public void NamedParametersUsePeftNames()
    {
        using var lm = WithRandomDora("llama");
        lm.AddAdapter("plain", new LoraConfig { R = 2, LoraAlpha = 4, TargetModules = ["q_proj"] }, seed: 1);
        var names = lm.Model.named_parameters().Select(p => p.name).ToHashSet();
        const string q = "model.layers.0.self_attn.q_proj";
        foreach (var n in new[] { $"{q}.base_layer.weight", $"{q}.lora_A.default.weight", $"{q}.lora_B.default.weight",
                     $"{q}.lora_magnitude_vector.default.weight", $"{q}.lora_A.plain.weight", $"{q}.lora_B.plain.weight" })
            Assert.Contains(n, names);
        Assert.DoesNotContain($"{q}.lora_magnitude_vector.plain.weight", names);
        // every adapter tensor the model lists is one LoraModel.Parameters hands to the optimizer, and the reverse
        var adapterParams = lm.Model.named_parameters().Where(p => p.name.Contains(".lora_")).Select(p => p.parameter.Handle).ToHashSet();
        Assert.Equal(adapterParams.Order(), lm.Parameters("default").Concat(lm.Parameters("plain")).Select(p => p.param.Handle).Order());
        lm.DeleteAdapter("plain");
        Assert.DoesNotContain(lm.Model.named_parameters(), p => p.name.Contains(".plain."));
    }

    [Fact]
    public void SavedDoraAdapterReloadsToTheSameLogits()
    {
        using var lm = WithRandomDora("qwen2");
        var expected = Logits(lm, Sample);
        var dir = Fixtures.TempDir();
        AdapterFiles.Save(lm, "default", dir);
        using (var f = SafetensorsFile.Open(Path.Combine(dir, AdapterFiles.WeightsFile)))
        {
            Assert.Contains("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector", f.Entries.Keys);
            Assert.Equal([lm.Model.Config.HiddenSize], f.Entries["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].Shape);
        }
        Assert.True(LoraConfig.Load(dir).UseDora);
        using var again = Base("qwen2");
        AdapterFiles.Load(again, "back", dir);
        Assert.True(Logits(again, Sample).eq(expected).all().item<bool>(), "a reloaded DoRA adapter must give the same logits bit for bit");
    }

    [Fact]
    public void DoraFilesWithoutTheFlagOrMagnitudeFailClosed()
    {
        using var lm = WithRandomDora("llama");
        var dir = Fixtures.TempDir();
        AdapterFiles.Save(lm, "default", dir);
        // use_dora false with magnitude tensors in the file
        var noFlag = Fixtures.CopyOf(dir);
        var cfgPath = Path.Combine(noFlag, AdapterFiles.ConfigFile);
        File.WriteAllText(cfgPath, File.ReadAllText(cfgPath).Replace("\"use_dora\": true", "\"use_dora\": false"));
        using var other = Base("llama");
        var ex = Assert.Throws<InvalidDataException>(() => AdapterFiles.Load(other, "x", noFlag));
        Assert.Contains("use_dora", ex.Message);
        // use_dora true but one magnitude missing
        var noMag = Fixtures.CopyOf(dir);
        var weights = Path.Combine(noMag, AdapterFiles.WeightsFile);
        using (var src = SafetensorsFile.Open(weights))
        {
            var kept = src.Entries.Keys.Where(k => k != "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector").ToDictionary(k => k, src.Read);
            SafetensorsWriter.Save(weights + ".tmp", kept);
        }
        File.Move(weights + ".tmp", weights, true);
        ex = Assert.Throws<InvalidDataException>(() => AdapterFiles.Load(other, "x", noMag));
        Assert.Contains("model.layers.1.self_attn.v_proj", ex.Message);
        Assert.Contains("lora_magnitude_vector", ex.Message);
        Assert.Empty(other.LoraLayers());
    }

    [Fact]
    public void FastPathDeclinesDoraAndGivesTheReferenceNumbers()
    {
        using var lm = WithRandomDora("llama");
        var down = (LoraLinear)lm.Model.model.layers[0].mlp.down_proj;
        Assert.False(LoraProjection.TryResolve(down, out _, out _), "the fused kernels compute plain LoRA only");
        Assert.NotNull(lm.FastTrainingDeclines("default"));
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), tok, new DataOptions());
        using var batch = Batches.Collate(samples.Take(3).ToList(), 0, CPU);
        lm.Model.train();
        (double loss, List<Tensor> grads) Run(bool fast)
        {
            lm.UseFastTraining(fast);
            var loss = Trainer.LossSum(lm.Model, batch, chunked: true);
            loss.backward();
            var grads = lm.Parameters("default").Select(p => p.param.grad!.clone()).ToList();
            foreach (var (_, p) in lm.Parameters("default")) p.grad!.zero_();
            return (loss.item<float>(), grads);
        }
        var (plainLoss, plainGrads) = Run(false);
        var (fastLoss, fastGrads) = Run(true);
        Assert.True(Math.Abs(fastLoss - plainLoss) <= 1e-5 * Math.Abs(plainLoss), $"loss {fastLoss} vs {plainLoss}");
        var keys = lm.Parameters("default").Select(p => p.key).ToList();
        for (int i = 0; i < plainGrads.Count; i++)
            Assert.True(Close.RelError(fastGrads[i], plainGrads[i]) <= 1e-4, $"{keys[i]}: {Close.RelError(fastGrads[i], plainGrads[i]):E2}");
        // the magnitude is trained
        Assert.Contains(keys.Zip(plainGrads), kg => kg.First.EndsWith(DoraVariant.MagnitudeSuffix) && kg.Second.abs().sum().item<float>() > 0);
    }

    [Fact]
    public void PerRowServingMixesDoraLoraAndBaseRows()
    {
        using var lm = WithRandomDora("qwen2", "d");
        lm.AddAdapter("l", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = AllLinear, InitLoraWeights = "false" }, seed: 5);
        var ids = tensor(new long[] { 4, 8, 15, 16, 23 }).unsqueeze(0);
        Tensor One(string? adapter)
        {
            if (adapter is null) lm.SetDisabled(true); else { lm.SetDisabled(false); lm.SetActive(adapter); }
            using var _ = no_grad();
            return lm.Model.Logits(ids, null, null)[0];
        }
        var (d, l, b) = (One("d"), One("l"), One(null));
        lm.SetDisabled(false);
        lm.SetRowAdapters(["l", "d", null, "d"]);
        Tensor rows;
        using (var _ = no_grad()) rows = lm.Model.Logits(ids.expand(4, -1).contiguous(), null, null);
        lm.SetRowAdapters(null);
        AssertClose(rows[0], l, "LoRA row");
        AssertClose(rows[1], d, "DoRA row");
        AssertClose(rows[2], b, "base row");
        AssertClose(rows[3], d, "second DoRA row");
    }

    [Fact]
    public void CombiningDoraAdaptersIsRefused()
    {
        using var lm = WithRandomDora("llama");
        var ex = Assert.Throws<ArgumentException>(() => AdapterCombiner.Combine(lm, ["default"], [1.0], "c", "cat"));
        Assert.Contains("DoRA", ex.Message);
    }

    /// <summary>
    /// LoraKit trains a DoRA adapter (3 AdamW steps): the loss falls and every tensor moves. With LORAKIT_WRITE_DORA_FIXTURE
    /// set it also writes fixtures/adapters/llama/dora_lorakit, which make_dora_fixtures.py loads into PEFT.
    /// </summary>
    [Fact]
    public void TrainsADoraAdapter()
    {
        using var lm = Base("llama");
        lm.AddAdapter("default", new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = AllLinear, UseDora = true }, seed: 21);
        var initial = lm.Parameters("default").Select(p => p.param.clone()).ToList();
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), tok, new DataOptions());
        using var batch = Batches.Collate(samples.Take(4).ToList(), 0, CPU);
        using var opt = new AdamW(lm.Parameters("default"), 0.9, 0.999, 1e-8, 0.0);
        lm.Model.train();
        var losses = new List<double>();
        for (int step = 0; step < 3; step++)
        {
            using var scope = NewDisposeScope();
            var loss = Trainer.LossSum(lm.Model, batch) / batch.Labels.ne(-100).sum();
            loss.backward();
            opt.Step(1e-2);
            losses.Add(loss.item<float>());
        }
        lm.Model.eval();
        Assert.True(losses[^1] < losses[0], $"losses {string.Join(", ", losses)}");
        var trained = lm.Parameters("default");
        foreach (var suffix in DoraVariant.Instance.FileSuffixes)
            Assert.Contains(trained.Zip(initial), p => p.First.key.EndsWith(suffix) && !p.First.param.eq(p.Second).all().item<bool>());
        if (Environment.GetEnvironmentVariable("LORAKIT_WRITE_DORA_FIXTURE") is { Length: > 0 })
            AdapterFiles.Save(lm, "default", Fixtures.Path_("adapters", "llama", "dora_lorakit"), "fixtures/models/llama");
    }

    /// <summary>
    /// <c>lorakit train --use-dora</c> writes a PEFT DoRA adapter (use_dora true, a magnitude per wrapped layer) that
    /// loads back as DoRA; a run without the flag keeps its old identity (use_dora is left out when off, so runs written
    /// before the flag existed still resume).
    /// </summary>
    [Fact]
    public void TrainCommandTrainsADoraAdapterWithUseDora()
    {
        var outDir = Path.Combine(Fixtures.TempDir(), "run");
        var (code, _, err) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", outDir, "--steps", "2", "--batch-size", "2", "--r", "4", "--use-dora", "--lora-dropout", "0", "--target-modules", "q_proj,v_proj");
        Assert.True(code == 0, err);
        var adapter = Path.Combine(outDir, "adapter");
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(adapter, "adapter_config.json")))!;
        Assert.True(config["use_dora"]!.GetValue<bool>());
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "default", adapter);
        Assert.Equal(2 * 2, lm.Parameters("default").Count(p => p.key.EndsWith(DoraVariant.Instance.FileSuffixes.Last())));
        Assert.False(new TrainConfig().Identity().ContainsKey("use_dora"));
        Assert.True(new TrainConfig { UseDora = true }.Identity()["use_dora"]!.GetValue<bool>());
    }
}
