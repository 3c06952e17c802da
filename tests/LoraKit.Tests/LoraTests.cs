using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>LoRA layers and PEFT file compatibility, against adapters and outputs made by PEFT (make_peft_fixtures.py).</summary>
public class LoraTests
{
    static LoraModel Base(string arch) => new(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));

    static string Adapter(string arch, string name) => Fixtures.Path_("adapters", arch, name);

    static Tensor Logits(LoraModel lm, string arch, int text)
    {
        var ids = Fixtures.Ids(Fixtures.Json("reference", $"peft_{arch}.json").GetProperty("texts")[text].GetProperty("input_ids"));
        using var _ = no_grad();
        return lm.Model.Logits(tensor(ids).unsqueeze(0), null, null)[0];
    }

    static Tensor Ref(string arch, string name) => Fixtures.ReferenceTensor($"peft_{arch}", name);

    static void AssertClose(Tensor actual, Tensor expected, string what, double tol = 1e-4)
    {
        double rel = Close.RelError(actual, expected);
        Assert.True(rel <= tol, $"{what}: relative error {rel:E2} > {tol:E0}");
    }

    public static TheoryData<string, string> PeftAdapters => new()
    {
        { "llama", "a" }, { "llama", "b" }, { "llama", "c" }, { "mistral", "a" }, { "qwen2", "a" }, { "qwen3", "a" }, { "qwen3", "regex" },
        { "llama", "a_b_cat" }, { "llama", "a_c_linear" }, { "llama", "a_b_svd" },
        { "phi3", "a" }, { "phi3", "b" }, { "phi4mini", "a" }, { "phi4mini", "b" },
        { "gemma2", "a" }, { "gemma2", "b" }, { "gemma3", "a" }, { "gemma3", "b" },
    };

    [Theory]
    [MemberData(nameof(PeftAdapters))]
    public void PeftAdapterGivesPeftLogits(string arch, string name)
    {
        using var lm = Base(arch);
        AdapterFiles.Load(lm, name, Adapter(arch, name));
        for (int i = 0; i < 2; i++) AssertClose(Logits(lm, arch, i), Ref(arch, $"{name}_{i}"), $"{arch}/{name} text {i}");
        Assert.True(Close.RelError(Logits(lm, arch, 0), Ref(arch, "base_0")) > 1e-3, "the adapter must change the logits");
    }

    [Fact]
    public void HotSwapBetweenLoadedAdaptersAndDisableGivesBaseExactly()
    {
        using var lm = Base("llama");
        foreach (var n in new[] { "a", "b", "c" }) AdapterFiles.Load(lm, n, Adapter("llama", n));
        foreach (var n in new[] { "b", "a", "c", "a" })
        {
            lm.SetActive(n);
            AssertClose(Logits(lm, "llama", 1), Ref("llama", $"{n}_1"), $"active {n}");
        }
        lm.SetDisabled(true);
        Assert.True(Logits(lm, "llama", 1).equal(Ref("llama", "base_1")).all().item<bool>() || Close.RelError(Logits(lm, "llama", 1), Ref("llama", "base_1")) <= 1e-4);
        using var plain = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        using var _ = no_grad();
        var ids = tensor(new long[] { 0, 5, 9, 77, 3 }).unsqueeze(0);
        Assert.True(lm.Model.Logits(ids, null, null).eq(plain.Logits(ids, null, null)).all().item<bool>(), "disabled adapters must give the base model bit for bit");
    }

    [Fact]
    public void FreshAdapterLeavesOutputsUnchangedBitForBit()
    {
        using var lm = Base("qwen2");
        var ids = tensor(new long[] { 1, 2, 3, 50, 60 }).unsqueeze(0);
        Tensor before;
        using (var _ = no_grad()) before = lm.Model.Logits(ids, null, null);
        lm.AddAdapter("fresh", new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ["q_proj", "v_proj", "down_proj"] }, seed: 3);
        using (var _ = no_grad()) Assert.True(lm.Model.Logits(ids, null, null).eq(before).all().item<bool>());
        // PEFT's init: A ~ U(±1/√in), B = 0.
        var (key, a) = lm.Parameters("fresh")[0];
        Assert.EndsWith("lora_A.weight", key);
        Assert.True(a.abs().max().item<float>() <= 1 / Math.Sqrt(64) && a.abs().max().item<float>() > 0);
        Assert.True(lm.Parameters("fresh")[1].param.eq(0).all().item<bool>());
    }

    [Theory]
    [InlineData("qwen3")]
    [InlineData("phi3")]
    [InlineData("phi4mini")]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void MergeInvariantsAndPeftMergedLogits(string arch)
    {
        using var lm = Base(arch);
        AdapterFiles.Load(lm, "a", Adapter(arch, "a"));
        var withAdapter = Logits(lm, arch, 0);
        var baseWeights = lm.Model.named_parameters().ToDictionary(p => p.name, p => p.parameter.clone());
        lm.Merge("a");
        var merged = Logits(lm, arch, 0);
        AssertClose(merged, withAdapter, "merged vs adapter");
        AssertClose(merged, Ref(arch, "merged_a_0"), "merged vs PEFT merge_and_unload");
        Assert.True(Close.RelError(merged, Ref(arch, "base_0")) > 1e-3, "merged must differ from base");
        lm.UnmergeAll();
        foreach (var (name, p) in lm.Model.named_parameters())
            Assert.True(Close.RelError(p, baseWeights[name]) <= 1e-6, $"{name} not restored by unmerge");
        AssertClose(Logits(lm, arch, 0), withAdapter, "unmerged then re-applied");
    }

    [Fact]
    public void SafeMergeRefusesNonFiniteWeightsAndChangesNothing()
    {
        using var lm = Base("llama");
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"));
        var (_, a) = lm.Parameters("a")[0];
        using (var _ = no_grad()) a[0, 0] = float.PositiveInfinity;
        var before = lm.Model.named_parameters().ToDictionary(p => p.name, p => p.parameter.clone());
        var ex = Assert.Throws<InvalidOperationException>(() => lm.Merge("a"));
        Assert.Contains("non-finite", ex.Message);
        foreach (var (name, p) in lm.Model.named_parameters()) Assert.True(p.eq(before[name]).all().item<bool>(), name);
    }

    [Fact]
    public void SaveLoadRoundTripIsBitIdentical()
    {
        using var lm = Base("qwen2");
        var cfg = AdapterFiles.Load(lm, "a", Adapter("qwen2", "a"));
        var dir = Fixtures.TempDir();
        AdapterFiles.Save(lm, "a", dir);
        using var original = SafetensorsFile.Open(Path.Combine(Adapter("qwen2", "a"), AdapterFiles.WeightsFile));
        using var saved = SafetensorsFile.Open(Path.Combine(dir, AdapterFiles.WeightsFile));
        Assert.Equal(original.Entries.Keys.Order(), saved.Entries.Keys.Order());
        foreach (var k in original.Entries.Keys) Assert.True(original.Read(k).eq(saved.Read(k)).all().item<bool>(), k);
        var back = LoraConfig.Load(dir);
        Assert.Equal(cfg.R, back.R);
        Assert.Equal(cfg.UseRslora, back.UseRslora);
        Assert.Equal(cfg.RankPattern, back.RankPattern);
        Assert.Equal(cfg.AlphaPattern, back.AlphaPattern);
        using var lm2 = Base("qwen2");
        AdapterFiles.Load(lm2, "again", dir);
        AssertClose(Logits(lm2, "qwen2", 1), Ref("qwen2", "a_1"), "reloaded");
    }

    [Theory]
    [InlineData("a_b_cat", "cat", new[] { "a", "b" }, new[] { 0.7, 0.3 }, null)]
    [InlineData("a_c_linear", "linear", new[] { "a", "c" }, new[] { 0.6, 0.4 }, null)]
    [InlineData("a_b_svd", "svd", new[] { "a", "b" }, new[] { 0.7, 0.3 }, 4)]
    public void CombinationsMatchPeftAddWeightedAdapter(string combo, string method, string[] names, double[] weights, int? svdRank)
    {
        using var lm = Base("llama");
        foreach (var n in names) AdapterFiles.Load(lm, n, Adapter("llama", n));
        var cfg = AdapterCombiner.Combine(lm, names, weights, combo, method, svdRank);
        lm.SetActive(combo);
        for (int i = 0; i < 2; i++) AssertClose(Logits(lm, "llama", i), Ref("llama", $"{combo}_{i}"), $"{combo} text {i}");
        var peftCfg = LoraConfig.Load(Adapter("llama", combo));
        Assert.Equal(peftCfg.R, cfg.R);
        Assert.Equal(peftCfg.LoraAlpha, cfg.LoraAlpha);
        Assert.Equal(peftCfg.TargetModules!.Order(), cfg.TargetModules!.Order());
        if (method != "svd") // SVD factors are unique only up to signs; the logits above cover it
        {
            using var peft = SafetensorsFile.Open(Path.Combine(Adapter("llama", combo), AdapterFiles.WeightsFile));
            foreach (var (key, p) in lm.Parameters(combo))
                AssertClose(p, peft.Read("base_model.model." + key), key, 1e-5);
        }
    }

    [Fact]
    public void TrainableParameterReportUsesPeftWordingAndCounts()
    {
        using var lm = Base("llama");
        long baseParams = lm.Model.parameters().Sum(p => p.numel()); // before the adapter: its tensors are registered parameters
        AdapterFiles.Load(lm, "a", Adapter("llama", "a"));
        long expected = Fixtures.Json("reference", "peft_llama.json").GetProperty("adapters").GetProperty("a").GetProperty("trainable_params").GetInt64();
        string report = lm.TrainableReport("a");
        Assert.Equal($"trainable params: {expected:N0} || all params: {baseParams + expected:N0} || trainable%: {100.0 * expected / (baseParams + expected):F4}", report);
    }

    [Theory]
    [InlineData(0, 8, 0.0, "r must be positive")]
    [InlineData(4, 0, 0.0, "lora_alpha must be positive")]
    [InlineData(4, 8, 1.0, "lora_dropout must be in [0, 1)")]
    [InlineData(4, 8, -0.1, "lora_dropout must be in [0, 1)")]
    public void InvalidConfigsAreRejectedBeforeAnythingIsBuilt(int r, double alpha, double dropout, string fragment)
    {
        using var lm = Base("llama");
        var ex = Assert.Throws<LoraConfigException>(() => lm.AddAdapter("x", new LoraConfig { R = r, LoraAlpha = alpha, LoraDropout = dropout, TargetModules = ["q_proj"] }));
        Assert.Contains(fragment, ex.Message);
        Assert.Empty(lm.LoraLayers());
    }

    [Fact]
    public void TargetMatchingNothingIsAnError()
    {
        using var lm = Base("llama");
        var ex = Assert.Throws<LoraConfigException>(() => lm.AddAdapter("x", new LoraConfig { TargetModules = ["c_attn"] }));
        Assert.Contains("match no linear layer", ex.Message);
        ex = Assert.Throws<LoraConfigException>(() => lm.AddAdapter("x", new LoraConfig { TargetModules = null, TargetRegex = @".*\.nothing" }));
        Assert.Contains("match no linear layer", ex.Message);
    }

    static string CopyAdapter(string arch, string name)
    {
        return Fixtures.CopyOf(Adapter(arch, name));
    }

    [Fact]
    public void AdapterForAnotherBaseFailsClosed()
    {
        using var lm = Base("qwen3"); // head_dim 32: q_proj is 64→128, unlike Llama's 64→64
        var ex = Assert.Throws<InvalidDataException>(() => AdapterFiles.Load(lm, "x", Adapter("llama", "a")));
        Assert.Contains("does not fit this base model", ex.Message);
        Assert.Empty(lm.LoraLayers()); // nothing was injected
    }

    [Fact]
    public void RankDifferentFromConfigFailsClosed()
    {
        var dir = CopyAdapter("llama", "a");
        var path = Path.Combine(dir, AdapterFiles.ConfigFile);
        File.WriteAllText(path, File.ReadAllText(path).Replace("\"r\": 4", "\"r\": 8"));
        using var lm = Base("llama");
        var ex = Assert.Throws<InvalidDataException>(() => AdapterFiles.Load(lm, "x", dir));
        Assert.Contains("r=8", ex.Message);
    }

    [Fact]
    public void KeysMatchingNoModuleFailClosed()
    {
        var dir = CopyAdapter("llama", "b");
        using (var src = SafetensorsFile.Open(Path.Combine(dir, AdapterFiles.WeightsFile)))
        {
            var renamed = src.Entries.Keys.ToDictionary(k => k.Replace("model.layers", "transformer.h"), src.Read);
            SafetensorsWriter.Save(Path.Combine(dir, AdapterFiles.WeightsFile + ".new"), renamed);
        }
        File.Move(Path.Combine(dir, AdapterFiles.WeightsFile + ".new"), Path.Combine(dir, AdapterFiles.WeightsFile), true);
        using var lm = Base("llama");
        var ex = Assert.Throws<InvalidDataException>(() => AdapterFiles.Load(lm, "x", dir));
        Assert.Contains("match a module", ex.Message);
    }

    [Fact]
    public void MissingWeightsForATargetedModuleFailClosed()
    {
        var dir = CopyAdapter("llama", "b");
        using (var src = SafetensorsFile.Open(Path.Combine(dir, AdapterFiles.WeightsFile)))
        {
            var kept = src.Entries.Keys.Where(k => !k.Contains("layers.1.self_attn.v_proj")).ToDictionary(k => k, src.Read);
            SafetensorsWriter.Save(Path.Combine(dir, "w.tmp"), kept);
        }
        File.Move(Path.Combine(dir, "w.tmp"), Path.Combine(dir, AdapterFiles.WeightsFile), true);
        using var lm = Base("llama");
        var ex = Assert.Throws<InvalidDataException>(() => AdapterFiles.Load(lm, "x", dir));
        Assert.Contains("model.layers.1.self_attn.v_proj", ex.Message);
    }

    [Fact]
    public void MergedExportLoadsAsAPlainCheckpointWithAdapterLogits()
    {
        using var lm = Base("qwen2");
        AdapterFiles.Load(lm, "a", Adapter("qwen2", "a"));
        lm.Merge("a");
        var outDir = Path.Combine(Fixtures.TempDir(), "merged");
        MergedCheckpoint.Save(lm, Fixtures.Model("qwen2"), outDir);
        using var merged = CausalLM.Load(outDir, ScalarType.Float32, CPU); // strict loader: no stray or missing keys
        using var _ = no_grad();
        var ids = tensor(Fixtures.Ids(Fixtures.Json("reference", "peft_qwen2.json").GetProperty("texts")[0].GetProperty("input_ids"))).unsqueeze(0);
        AssertClose(merged.Logits(ids, null, null)[0], Ref("qwen2", "merged_a_0"), "exported merged checkpoint");
        Assert.True(File.Exists(Path.Combine(outDir, "tokenizer.json")));
    }
}

public class CombinationWithRankPatternTests
{
    [Fact]
    public void CatOfAnAdapterWithRankPatternKeepsItsDelta()
    {
        // qwen2/a has rank_pattern (q_proj r=2, layers.1.mlp.down_proj r=6): cat must size the result from real ranks.
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("qwen2"), ScalarType.Float32, CPU));
        AdapterFiles.Load(lm, "a", Fixtures.Path_("adapters", "qwen2", "a"));
        var cfg = AdapterCombiner.Combine(lm, ["a"], [1.0], "cat1", "cat");
        Assert.Equal(6, cfg.R);
        foreach (var (key, layer) in lm.LoraLayers())
            Assert.True(Close.RelError(layer.DeltaWeight("cat1"), layer.DeltaWeight("a")) <= 1e-6, key);
        Assert.Throws<ArgumentException>(() => AdapterCombiner.Combine(lm, ["a"], [1.0], "lin", "linear"));
    }
}
