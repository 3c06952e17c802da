using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Serving;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Serving;

/// <summary>
/// The adapter tiers under pressure: one device slot, one host slot, three adapters requested concurrently. Every
/// request still gets its solo tokens; requests wait for the busy device slot instead of failing; evictions and reads
/// are counted where they happen.
/// </summary>
public class AdapterTierTests
{
    [Fact]
    public async Task ThreeAdaptersThroughOneDeviceSlotAndOneHostSlotGiveTheirSoloTokens()
    {
        var dir = Fixtures.Model("llama");
        var tok = Tokenizer.Load(dir);
        string[] names = ["a", "b", "c"];
        var root = Fixtures.TempDir();
        foreach (var n in names) Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", n), Path.Combine(root, n));
        var opts = new SamplingOptions { MaxNewTokens = 6, EosTokenIds = [] };
        var expected = new Dictionary<string, int[]>();
        using (var solo = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU)))
        {
            var gen = new TextGenerator(solo.Model, tok);
            foreach (var n in names)
            {
                AdapterFiles.Load(solo, n, Path.Combine(root, n));
                solo.SetActive(n);
                expected[n] = gen.Generate(tok.Encode("Hello, world!"), opts).OutputIds;
            }
        }
        var evicted = new System.Collections.Concurrent.ConcurrentBag<string>();
        using var engine = new InferenceEngine(new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU)), tok, new EngineOptions { MaxBatch = 4 });
        var registry = new AdapterRegistry(engine, root, maxLoaded: 1) { MaxHostAdapters = 1, OnEvicted = evicted.Add };
        async Task<(string, int[])> One(string name)
        {
            using var lease = await registry.AcquireAsync(name);
            return (name, (await engine.GenerateAsync(tok.Encode("Hello, world!"), name, opts)).OutputIds);
        }
        var results = await Task.WhenAll(names.Concat(names).Select(n => Task.Run(() => One(n))));
        foreach (var (name, ids) in results) Assert.Equal(expected[name], ids);
        var (deviceHits, hostHits, reads) = registry.CacheStats;
        Assert.Equal(6, deviceHits + hostHits + reads);
        Assert.True(reads >= 3, $"each adapter is read at least once ({reads})");
        Assert.Contains("gpu", evicted);
        Assert.Contains("cpu", evicted);
        Assert.Single(registry.Loaded);
    }
}
