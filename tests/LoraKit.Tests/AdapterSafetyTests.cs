using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Generation;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Serving;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// Issue 16 items 6-8 (and 18's run folder): adapters run in eval mode outside training, are refused on a base they were
/// not written for, and never carry non-finite or absurd weights or ranks into a model or a file.
/// </summary>
public class AdapterSafetyTests
{
    static LoraModel Base(string arch, ScalarType? dtype = null) => new(CausalLM.Load(Fixtures.Model(arch), dtype ?? ScalarType.Float32, CPU));

    static string Adapter(string arch, string name) => Fixtures.Path_("adapters", arch, name);

    static long[] Ids(string reference, int text) =>
        Fixtures.Ids(Fixtures.Json("reference", reference + ".json").GetProperty("texts")[text].GetProperty("input_ids"));

    static Tensor Logits(CausalLM m, long[] ids)
    {
        using var _ = no_grad();
        return m.Logits(tensor(ids).unsqueeze(0), null, null)[0];
    }

    /// <summary>A copy of a fixture adapter with some adapter_config.json fields changed.</summary>
    static string EditedCopy(string source, Action<JsonObject> edit)
    {
        var dir = Fixtures.CopyOf(source);
        var path = Path.Combine(dir, AdapterFiles.ConfigFile);
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(o);
        File.WriteAllText(path, o.ToJsonString());
        return dir;
    }

    // ---- item 6: eval mode ----

    [Fact]
    public void LoadsReturnEvalModeModels()
    {
        using var lm = Base("llama");
        Assert.All(lm.Model.modules(), m => Assert.False(m.training));
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"));
        Assert.All(lm.Model.modules(), m => Assert.False(m.training));
        Assert.NotEmpty(lm.LoraLayers());
        lm.Model.train(); // as a trainer leaves it: wrapping and serving switch back
        _ = new LoraModel(lm.Model); // (not disposed: it would dispose the shared model)
        Assert.All(lm.Model.modules(), m => Assert.False(m.training));
        lm.Model.train();
        using var engine = new InferenceEngine(lm, Tokenizer.Load(Fixtures.Model("llama")));
        Assert.All(lm.Model.modules(), m => Assert.False(m.training));
    }

    /// <summary>
    /// PEFT applies LoRA dropout only in training mode, so PEFT's logits for adapter llama/a are the reference for the same
    /// weights saved with any lora_dropout: the library must match them, twice in a row, and so must the merged model.
    /// </summary>
    [Fact]
    public void AdapterWithDropoutIsDeterministicAndEqualsPeftAndTheMergedModel()
    {
        var dir = EditedCopy(Adapter("llama", "a"), o => o["lora_dropout"] = 0.3);
        using var lm = Base("llama");
        Assert.Equal(0.3, AdapterFiles.Load(lm, "d", dir).LoraDropout);
        for (int i = 0; i < 2; i++)
        {
            var ids = Ids("peft_llama", i);
            var first = Logits(lm.Model, ids);
            Assert.True(first.eq(Logits(lm.Model, ids)).all().item<bool>(), "two passes must agree bit for bit");
            Assert.True(Close.RelError(first, Fixtures.ReferenceTensor("peft_llama", $"a_{i}")) <= 1e-4, $"text {i} differs from PEFT's eval-mode logits");
        }
        lm.Merge("d");
        for (int i = 0; i < 2; i++)
            Assert.True(Close.RelError(Logits(lm.Model, Ids("peft_llama", i)), Fixtures.ReferenceTensor("peft_llama", $"merged_a_{i}")) <= 1e-4);
    }

    [Fact]
    public async Task CliScoreAndGenerateWithDropoutAreDeterministicAndAgreeWithLibraryAndServing()
    {
        var dir = EditedCopy(Adapter("llama", "a"), o => o["lora_dropout"] = 0.3);
        string text = Fixtures.Json("reference", "peft_llama.json").GetProperty("texts")[0].GetProperty("text").GetString()!;
        var scores = Enumerable.Range(0, 2).Select(_ => CliTests.RunCli("score", "--model", Fixtures.Model("llama"), "--adapter", dir, "--text", text, "--json", "--device", "cpu")).ToList();
        Assert.All(scores, s => Assert.True(s.code == 0, s.stderr));
        Assert.Equal(scores[0].stdout, scores[1].stdout);
        double cliLoss = JsonDocument.Parse(scores[0].stdout).RootElement.GetProperty("loss").GetDouble();

        // The merged model (no dropout anywhere) gives the same loss.
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "d", dir);
        lm.Merge("d");
        var ids = Ids("peft_llama", 0);
        double merged;
        using (var _ = no_grad()) merged = CausalLM.NextTokenLoss(Logits(lm.Model, ids), tensor(ids)).item<float>();
        Assert.True(Math.Abs(cliLoss - merged) <= 1e-4 * Math.Abs(merged), $"CLI loss {cliLoss} vs merged model {merged}");

        var gens = Enumerable.Range(0, 2).Select(_ => CliTests.RunCli("generate", "--model", Fixtures.Model("llama"), "--adapter", dir, "--prompt", "The quick",
            "--max-new-tokens", "12", "--json", "--device", "cpu")).ToList();
        Assert.All(gens, g => Assert.True(g.code == 0, g.stderr));
        Assert.Equal(gens[0].stdout, gens[1].stdout);
        var cliIds = Fixtures.Ids(JsonDocument.Parse(gens[0].stdout).RootElement.GetProperty("output_ids"));

        // The serving engine (per-row LoRA) generates the same tokens.
        using var served = Base("llama");
        AdapterFiles.Load(served, "d", dir);
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        using var engine = new InferenceEngine(served, tok);
        var eos = StopTokens.EosTokenIds(served.Model.Config, tok, Fixtures.Model("llama"));
        var result = await engine.GenerateAsync(tok.Encode("The quick"), "d", new SamplingOptions { MaxNewTokens = 12, EosTokenIds = eos });
        Assert.Equal(cliIds, result.OutputIds.Select(x => (long)x).ToArray());
    }

    /// <summary>
    /// An adapter saved by PEFT with lora_dropout=0.1 and PEFT's eval-mode logits (scripts/fixtures/make_peft_fixtures.py,
    /// "dropout" variant: fixtures/adapters/llama/dropout, fixtures/reference/peft_llama_dropout.*).
    /// </summary>
    [Fact]
    public void PeftAdapterWithDropoutGivesPeftEvalLogits()
    {
        var dir = Adapter("llama", "dropout");
        Assert.True(Directory.Exists(dir) && File.Exists(Fixtures.Path_("reference", "peft_llama_dropout.safetensors")),
            "fixture missing: run `python3 scripts/fixtures/make_peft_fixtures.py fixtures fixtures dropout` (torch, transformers, peft)");
        using var lm = Base("llama");
        Assert.True(AdapterFiles.Load(lm, "dropout", dir).LoraDropout > 0, "the fixture must have dropout");
        for (int i = 0; i < 2; i++)
        {
            var ids = Ids("peft_llama_dropout", i);
            var first = Logits(lm.Model, ids);
            Assert.True(first.eq(Logits(lm.Model, ids)).all().item<bool>());
            Assert.True(Close.RelError(first, Fixtures.ReferenceTensor("peft_llama_dropout", $"dropout_{i}")) <= 1e-4, $"text {i}");
            Assert.True(Close.RelError(first, Fixtures.ReferenceTensor("peft_llama_dropout", $"base_{i}")) > 1e-3, "the adapter must change the logits");
        }
        lm.Merge("dropout");
        for (int i = 0; i < 2; i++)
            Assert.True(Close.RelError(Logits(lm.Model, Ids("peft_llama_dropout", i)), Fixtures.ReferenceTensor("peft_llama_dropout", $"merged_dropout_{i}")) <= 1e-4);
    }

    // ---- item 7: adapters carry their base ----

    /// <summary>llama/a re-saved by LoraKit: records its base by name and fingerprint.</summary>
    static string SavedOnLlama()
    {
        var dir = Fixtures.TempDir();
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"));
        AdapterFiles.Save(lm, "a", dir);
        return dir;
    }

    [Fact]
    public void SavedAdapterRecordsItsBase()
    {
        var dir = SavedOnLlama();
        using var f = SafetensorsFile.Open(Path.Combine(dir, AdapterFiles.WeightsFile));
        using var lm = Base("llama");
        Assert.Equal(lm.Model.Fingerprint, f.Metadata[BaseFingerprint.MetadataKey]);
        Assert.Equal("llama", f.Metadata[BaseFingerprint.ModelTypeKey]);
        Assert.Equal(Fixtures.Model("llama"), LoraConfig.Load(dir).BaseModelNameOrPath);
    }

    [Fact]
    public void FingerprintIsTheSameForFp32AndBf16LoadsAndDiffersBetweenBases()
    {
        using var fp32 = Base("llama");
        using var bf16 = Base("llama", ScalarType.BFloat16);
        using var qwen2 = Base("qwen2");
        Assert.NotNull(fp32.Model.Fingerprint);
        Assert.Equal(fp32.Model.Fingerprint, bf16.Model.Fingerprint);
        Assert.NotEqual(fp32.Model.Fingerprint, qwen2.Model.Fingerprint);
        // The same checkpoint saved in bf16 (rounded to nearest, as torch does) is the same base too.
        var copy = Fixtures.CopyOf(Fixtures.Model("llama"));
        var path = Path.Combine(copy, "model.safetensors");
        var tensors = new Dictionary<string, Tensor>();
        using (var f = SafetensorsFile.Open(path))
            foreach (var name in f.Entries.Keys) tensors[name] = f.Read(name).to(ScalarType.BFloat16);
        SafetensorsWriter.Save(path, tensors);
        using var stored16 = new LoraModel(CausalLM.Load(copy, ScalarType.Float32, CPU));
        Assert.Equal(fp32.Model.Fingerprint, stored16.Model.Fingerprint);
    }

    [Fact]
    public void AdapterSavedOnLlamaIsRefusedOnQwen2UnlessAllowed()
    {
        var dir = SavedOnLlama();
        using var lm = Base("qwen2"); // same layer shapes as llama: only the recorded base tells them apart
        var ex = Assert.Throws<AdapterBaseMismatchException>(() => AdapterFiles.Load(lm, "x", dir));
        Assert.Contains("another base model", ex.Message);
        Assert.Contains("qwen2", ex.Message);
        Assert.Empty(lm.Configs);
        var warnings = new List<string>();
        AdapterFiles.Load(lm, "x", dir, new AdapterLoadOptions { AllowBaseMismatch = true, Warn = warnings.Add });
        Assert.Single(warnings);
        Assert.Contains("x", lm.Configs.Keys);
    }

    [Fact]
    public void AdapterIsRefusedOnABaseWithTheSameShapesButOtherWeights()
    {
        var dir = SavedOnLlama();
        var other = Fixtures.CopyOf(Fixtures.Model("llama"));
        var path = Path.Combine(other, "model.safetensors");
        var tensors = new Dictionary<string, Tensor>();
        using (var f = SafetensorsFile.Open(path))
            foreach (var name in f.Entries.Keys) tensors[name] = f.Read(name);
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"] * 1.1; // "fine-tuned"
        SafetensorsWriter.Save(path, tensors);
        using var lm = new LoraModel(CausalLM.Load(other, ScalarType.Float32, CPU));
        Assert.Throws<AdapterBaseMismatchException>(() => AdapterFiles.Load(lm, "x", dir));
        using var same = Base("llama", ScalarType.BFloat16);
        AdapterFiles.Load(same, "x", dir); // the same checkpoint in another dtype is the same base
    }

    [Fact]
    public void PeftAdapterWithoutFingerprintLoadsAndWarnsWhenTheBaseNameDiffers()
    {
        using var lm = Base("qwen2");
        var warnings = new List<string>();
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"), new AdapterLoadOptions { Warn = warnings.Add });
        Assert.Contains(warnings, w => w.Contains("fixtures/models/llama") && w.Contains("qwen2"));
        warnings.Clear();
        using var llama = Base("llama");
        AdapterFiles.Load(llama, "a", Adapter("llama", "a"), new AdapterLoadOptions { Warn = warnings.Add });
        Assert.Empty(warnings);
    }

    [Fact]
    public async Task ServerRegistryRefusesAnAdapterForAnotherBaseWithAnErrorThatMapsTo422()
    {
        var root = Fixtures.TempDir();
        var saved = SavedOnLlama();
        Fixtures.CopyOf(saved, Path.Combine(root, "llama-made"));
        using var lm = Base("qwen2");
        using var engine = new InferenceEngine(lm, Tokenizer.Load(Fixtures.Model("qwen2")));
        var registry = new AdapterRegistry(engine, root, 2);
        await Assert.ThrowsAsync<AdapterBaseMismatchException>(() => registry.LoadAsync("llama-made", reload: false));
        var allowing = new AdapterRegistry(engine, root, 2) { AllowBaseMismatch = true };
        await allowing.LoadAsync("llama-made", reload: false);
        Assert.Contains("llama-made", allowing.Loaded);
    }

    [Fact]
    public void CliMergeRefusesAnAdapterForAnotherBaseAndNamesTheOverride()
    {
        var saved = SavedOnLlama();
        var outDir = Path.Combine(Fixtures.TempDir(), "merged");
        var (code, _, stderr) = CliTests.RunCli("merge", "--no-gate", "--model", Fixtures.Model("qwen2"), "--adapter", saved, "--output", outDir);
        Assert.Equal(1, code);
        Assert.Contains("--allow-base-mismatch", stderr);
        Assert.False(Directory.Exists(outDir));
        (code, _, stderr) = CliTests.RunCli("merge", "--no-gate", "--model", Fixtures.Model("qwen2"), "--adapter", saved, "--output", outDir, "--allow-base-mismatch");
        Assert.True(code == 0, stderr);
    }

    // ---- item 8: non-finite and absurd values ----

    static string WithWeights(string source, Func<string, Tensor, Tensor> edit)
    {
        var dir = Fixtures.CopyOf(source);
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        var tensors = new Dictionary<string, Tensor>();
        using (var f = SafetensorsFile.Open(path))
            foreach (var name in f.Entries.Keys) tensors[name] = edit(name, f.Read(name));
        SafetensorsWriter.Save(path, tensors);
        return dir;
    }

    [Theory]
    [InlineData(double.NaN)]
    [InlineData(double.PositiveInfinity)]
    [InlineData(1e38)]
    public void NonFiniteOrAbsurdAdapterWeightsAreRefusedNamingTheTensor(double bad)
    {
        const string victim = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
        var dir = WithWeights(Adapter("llama", "a"), (name, t) =>
        {
            if (name != victim) return t;
            var c = t.clone();
            c[3, 1] = tensor((float)bad);
            return c;
        });
        using var lm = Base("llama");
        var ex = Assert.Throws<WeightValueException>(() => AdapterFiles.Load(lm, "x", dir));
        Assert.Contains(victim, ex.Message);
        Assert.Empty(lm.Configs);
    }

    [Fact]
    public void SavingNonFiniteWeightsWritesNothing()
    {
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"));
        using (var _ = no_grad()) lm.Parameters("a")[0].param[0, 0] = float.NaN;
        var dir = Path.Combine(Fixtures.TempDir(), "out");
        var ex = Assert.Throws<WeightValueException>(() => AdapterFiles.Save(lm, "a", dir));
        Assert.Contains(lm.Parameters("a")[0].key, ex.Message);
        Assert.False(Directory.Exists(dir));
    }

    [Theory]
    [InlineData(double.NaN)]
    [InlineData(double.PositiveInfinity)]
    [InlineData(1e300)]
    public void CombineRefusesNonFiniteOrHugeWeights(double w)
    {
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"));
        AdapterFiles.Load(lm, "b", Adapter("llama", "b"));
        var ex = Assert.Throws<ArgumentException>(() => AdapterCombiner.Combine(lm, ["a", "b"], [0.5, w], "c", "cat"));
        Assert.Contains("'b'", ex.Message);
        Assert.False(lm.Configs.ContainsKey("c"));
    }

    [Fact]
    public void CombineSvdRankIsBoundedByTheLayerDimensions()
    {
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"));
        AdapterFiles.Load(lm, "b", Adapter("llama", "b"));
        var ex = Assert.Throws<ArgumentException>(() => AdapterCombiner.Combine(lm, ["a", "b"], [0.7, 0.3], "c", "svd", 100000));
        Assert.Contains("100000", ex.Message);
        Assert.False(lm.Configs.ContainsKey("c"));
    }

    [Fact]
    public void CliCombineWithNanWeightWritesNothing()
    {
        var outDir = Path.Combine(Fixtures.TempDir(), "combined");
        var (code, _, stderr) = CliTests.RunCli("combine", "--model", Fixtures.Model("llama"), "--adapters",
            $"{Adapter("llama", "a")}:nan,{Adapter("llama", "b")}:0.5", "--output", outDir);
        Assert.Equal(1, code);
        Assert.StartsWith("error: ", stderr);
        Assert.False(Directory.Exists(outDir) && Directory.EnumerateFileSystemEntries(outDir).Any());
    }

    [Fact]
    public void RanksAboveTheLayerDimensionsAreRefused()
    {
        using var lm = Base("llama");
        var ex = Assert.Throws<LoraConfigException>(() => lm.AddAdapter("big", new LoraConfig { R = 100000, LoraAlpha = 16, TargetModules = ["q_proj"] }));
        Assert.Contains("100000", ex.Message);
        Assert.Empty(lm.Configs);
        var dir = EditedCopy(Adapter("llama", "b"), o => o["rank_pattern"] = new JsonObject { ["q_proj"] = 5000 });
        Assert.Throws<LoraConfigException>(() => AdapterFiles.Load(lm, "x", dir));
    }

    // ---- item 18: a run folder passed as an adapter ----

    [Fact]
    public void RunFolderPassedAsAdapterSuggestsItsAdapterSubfolder()
    {
        var run = Fixtures.TempDir();
        Fixtures.CopyOf(Adapter("llama", "a"), Path.Combine(run, "adapter"));
        using var lm = Base("llama");
        var ex = Assert.Throws<LoraConfigException>(() => AdapterFiles.Load(lm, "x", run));
        Assert.Contains(Path.Combine(run, "adapter"), ex.Message);
        Assert.Contains("run folder", ex.Message);
    }
}
