using LoraKit.Generation;
using LoraKit.Models;
using LoraKit.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Tests;

public class GenerationTests
{
    public static TheoryData<string> Archs => new(Fixtures.Architectures);

    [Theory]
    [MemberData(nameof(Archs))]
    public void GreedyIdsMatchTransformersGenerate(string arch)
    {
        var dir = Fixtures.Model(arch);
        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(dir);
        foreach (var g in Fixtures.Json("reference", arch + ".json").GetProperty("generations").EnumerateArray())
        {
            var promptIds = tok.Encode(g.GetProperty("prompt").GetString()!);
            Assert.Equal(Fixtures.Ids(g.GetProperty("prompt_ids")).Select(x => (int)x), promptIds);
            var expected = Fixtures.Ids(g.GetProperty("output_ids")).Select(x => (int)x).ToArray();
            var options = new SamplingOptions { MaxNewTokens = 20, EosTokenIds = StopTokens.EosTokenIds(model.Config, tok, dir) };
            var result = new TextGenerator(model, tok).Generate(promptIds, options);
            Assert.Equal(expected, result.OutputIds);
            Assert.Equal(g.GetProperty("text").GetString(), result.Text);
        }
    }

    [Fact]
    public void KvCacheStepsEqualOneFullForward()
    {
        using var model = CausalLM.Load(Fixtures.Model("mistral"), ScalarType.Float32, CPU); // sliding window 24
        using var _ = no_grad();
        var ids = arange(1, 41, ScalarType.Int64).unsqueeze(0);
        var full = model.Logits(ids, null, null);
        using var cache = new KvCache(model.Config.NumHiddenLayers);
        var first = model.Logits(ids[.., ..30], null, cache);
        var rest = Enumerable.Range(30, 10).Select(i => model.Logits(ids[.., i..(i + 1)], null, cache)).ToList();
        var stepped = cat([first, .. rest], 1);
        Assert.True(Close.RelError(stepped, full) < 1e-5);
    }

    [Fact]
    public void SeededSamplingIsReproducibleAndTopK1IsGreedy()
    {
        var dir = Fixtures.Model("qwen3");
        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        var gen = new TextGenerator(model, Tokenizer.Load(dir));
        int[] prompt = [5, 6, 7];
        var s1 = gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 1.5, Seed = 7 });
        var s2 = gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 1.5, Seed = 7 });
        var s3 = gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 1.5, Seed = 8 });
        Assert.Equal(s1.OutputIds, s2.OutputIds);
        Assert.NotEqual(s1.OutputIds, s3.OutputIds);
        var greedy = gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 12 });
        Assert.Equal(greedy.OutputIds, gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 0.7, TopK = 1, Seed = 3 }).OutputIds);
        Assert.Equal(greedy.OutputIds, gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 0.7, TopP = 1e-6, Seed = 3 }).OutputIds);
    }

    [Fact]
    public void StopsOnEosAndOnStopStrings()
    {
        var dir = Fixtures.Model("llama");
        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(dir);
        var gen = new TextGenerator(model, tok);
        var prompt = tok.Encode("Hello, world! How are");
        var free = gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 20 });
        // Make the third generated token an end-of-sequence id: generation must stop right after it.
        var eos = gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 20, EosTokenIds = [free.OutputIds[2]] });
        Assert.Equal(free.OutputIds[..3], eos.OutputIds);
        Assert.Equal(FinishReason.Stop, eos.FinishReason);
        // A stop string taken from the free-running text: the text is cut before it.
        string stopAt = free.Text.Substring(free.Text.Length - 6, 4);
        var stopped = gen.Generate(prompt, new SamplingOptions { MaxNewTokens = 20, StopStrings = [stopAt] });
        Assert.Equal(free.Text[..free.Text.IndexOf(stopAt, StringComparison.Ordinal)], stopped.Text);
        Assert.Equal(FinishReason.Stop, stopped.FinishReason);
    }

    [Fact]
    public void NativeTensorCountStaysFlatAcrossManySteps()
    {
        var dir = Fixtures.Model("qwen2");
        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        var gen = new TextGenerator(model, Tokenizer.Load(dir));
        gen.Generate([1, 2, 3], new SamplingOptions { MaxNewTokens = 4 }); // warm-up
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        gen.Generate([1, 2, 3], new SamplingOptions { MaxNewTokens = 10 });
        long afterShort = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        gen.Generate([1, 2, 3], new SamplingOptions { MaxNewTokens = 100, Temperature = 1, Seed = 1 });
        long afterLong = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        using (var probe = zeros(3)) // the counter does see live tensors, so equality below is meaningful
            Assert.Equal(afterLong + 1, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        Assert.Equal(before, afterShort);
        Assert.Equal(before, afterLong);
    }
}
