using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Serving;
using LoraKit.Serving.Paged;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Serving;

/// <summary>
/// The paged engine's invariants on the CPU, against each request's solo greedy tokens (TextGenerator, the reference):
/// requests joining and leaving in any order, prompts prefilled in chunks beside decoding rows, a cache so small that
/// sequences are preempted and recomputed, adapters of several variants in one step, cancelled streams freeing blocks.
/// </summary>
public class PagedEngineTests
{
    static readonly string[] Prompts = ["Hello, world! How are", "def forward(x):", "Numbers like 12345 and 678", "The quick brown fox jumps over the lazy dog again and again",
        "reset my password", "Low-rank adapters", "my invoice is wrong and I want", "Customers ask about", "a", "Once upon a time in a land far away, there lived"];

    static List<int[]> Solo(string dir, Tokenizer tok, string?[] adapters, string[] adapterNames, string arch, int[] maxNew)
    {
        using var solo = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU));
        foreach (var a in adapterNames) AdapterFiles.Load(solo, a, Fixtures.Path_("adapters", arch, a));
        var gen = new TextGenerator(solo.Model, tok);
        var expected = new List<int[]>();
        for (int i = 0; i < adapters.Length; i++)
        {
            if (adapters[i] is string a) { solo.SetDisabled(false); solo.SetActive(a); } else solo.SetDisabled(true);
            expected.Add(gen.Generate(tok.Encode(Prompts[i % Prompts.Length]), new SamplingOptions { MaxNewTokens = maxNew[i], EosTokenIds = [] }).OutputIds);
        }
        return expected;
    }

    static LoraModel Served(string dir, string arch, string[] adapterNames)
    {
        var lm = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU));
        foreach (var a in adapterNames) AdapterFiles.Load(lm, a, Fixtures.Path_("adapters", arch, a));
        lm.SetActive();
        return lm;
    }

    [Theory]
    [InlineData(1, 64, null)]     // roomy: plain continuous batching
    [InlineData(2, 7, null)]      // a budget of 7 tokens a step: every prompt prefills in chunks beside decoding rows
    [InlineData(3, 64, 11)]       // 11 blocks of 4 positions: sequences are preempted, recomputed, and still give their tokens
    [InlineData(4, 5, 12)]        // both
    public async Task RequestsJoiningAndLeavingInAnyOrderGetTheirSoloTokens(int seed, int tokenBudget, int? blocks)
    {
        var dir = Fixtures.Model("llama");
        var tok = Tokenizer.Load(dir);
        string[] names = ["a", "b", "dora"];
        var rng = new Random(seed);
        int n = 10;
        var adapters = Enumerable.Range(0, n).Select(_ => rng.Next(4) switch { 0 => null, 1 => "a", 2 => "b", _ => "dora" }).ToArray();
        var maxNew = Enumerable.Range(0, n).Select(_ => 1 + rng.Next(14)).ToArray();
        var expected = Solo(dir, tok, adapters, names, "llama", maxNew);

        using var engine = new InferenceEngine(Served(dir, "llama", names), tok,
            new EngineOptions { MaxBatch = 4, MaxTokensPerStep = tokenBudget, BlockSize = 4, KvCacheBlocks = blocks });
        var tasks = new List<Task<GenerationResult>>();
        for (int i = 0; i < n; i++) // arrivals spread over the run: sequences join a batch that is already decoding
        {
            tasks.Add(engine.GenerateAsync(tok.Encode(Prompts[i]), adapters[i], new SamplingOptions { MaxNewTokens = maxNew[i], EosTokenIds = [] }));
            if (rng.Next(2) == 0) await Task.Delay(rng.Next(5));
        }
        var results = await Task.WhenAll(tasks);
        for (int i = 0; i < n; i++) Assert.True(expected[i].SequenceEqual(results[i].OutputIds), $"request {i} ({adapters[i] ?? "base"}): expected [{string.Join(",", expected[i])}], got [{string.Join(",", results[i].OutputIds)}]");
        await WaitIdle(engine);
        Assert.Equal(0, engine.KvBlocksUsed);
        if (tokenBudget < 10) Assert.True(engine.MixedSteps > 0, "a small budget should mix prefill chunks with decode steps");
        if (blocks is not null) Assert.True(engine.Preemptions > 0, "a small cache should have preempted sequences");
    }

    [Fact]
    public async Task ACancelledStreamFreesItsBlocksAndOthersFinish()
    {
        var dir = Fixtures.Model("qwen3");
        var tok = Tokenizer.Load(dir);
        using var engine = new InferenceEngine(new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU)), tok, new EngineOptions { MaxBatch = 4, BlockSize = 4 });
        using var cts = new CancellationTokenSource();
        var first = new TaskCompletionSource();
        var cancelled = engine.GenerateAsync(tok.Encode("Hello, world!"), null, new SamplingOptions { MaxNewTokens = 200, EosTokenIds = [] },
            _ => first.TrySetResult(), cts.Token);
        var other = engine.GenerateAsync(tok.Encode("The quick brown fox"), null, new SamplingOptions { MaxNewTokens = 30, EosTokenIds = [] });
        await first.Task;
        Assert.True(engine.KvBlocksUsed > 0);
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => cancelled);
        Assert.Equal(30, (await other).OutputIds.Length);
        await WaitIdle(engine);
        Assert.Equal(0, engine.KvBlocksUsed);
    }

    [Fact]
    public async Task ASequenceLongerThanTheWholeCacheFailsWithAClearErrorAndTheEngineGoesOn()
    {
        var dir = Fixtures.Model("llama");
        var tok = Tokenizer.Load(dir);
        using var engine = new InferenceEngine(new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU)), tok, new EngineOptions { MaxBatch = 2, BlockSize = 4, KvCacheBlocks = 3 });
        var tooLong = engine.GenerateAsync(tok.Encode(Prompts[3] + Prompts[9]), null, new SamplingOptions { MaxNewTokens = 4, EosTokenIds = [] });
        var ex = await Assert.ThrowsAsync<KvCacheFullException>(() => tooLong);
        Assert.Contains("KV cache", ex.Message);
        Assert.DoesNotContain("\n", ex.Message);
        var growing = engine.GenerateAsync(tok.Encode("a"), null, new SamplingOptions { MaxNewTokens = 30, EosTokenIds = [] });
        var ex2 = await Assert.ThrowsAsync<KvCacheFullException>(() => growing); // outgrows 12 positions while decoding
        Assert.Contains("raise --kv-cache-memory", ex2.Message);
        var fits = await engine.GenerateAsync(tok.Encode("a"), null, new SamplingOptions { MaxNewTokens = 4, EosTokenIds = [] });
        Assert.Equal(4, fits.OutputIds.Length);
        Assert.Equal(0, engine.KvBlocksUsed);
    }

    [Theory]
    [InlineData("phi3")]     // LongRoPE: sequences crossing original_max_position_embeddings are recomputed with the long factors
    [InlineData("gemma2")]   // sliding windows and soft-capped scores over paged keys
    [InlineData("mistral")]
    public async Task OtherFamiliesGetTheirSoloTokens(string arch)
    {
        var dir = Fixtures.Model(arch);
        var tok = Tokenizer.Load(dir);
        var c = ModelConfig.Load(dir);
        int n = 6;
        // Long enough to cross small windows and LongRoPE's original length on the tiny fixtures.
        var maxNew = Enumerable.Range(0, n).Select(i => Math.Min(40 + 7 * i, c.MaxPositionEmbeddings - 20)).ToArray();
        var adapters = new string?[n];
        var expected = Solo(dir, tok, adapters, [], arch, maxNew);
        using var engine = new InferenceEngine(new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU)), tok, new EngineOptions { MaxBatch = 3, MaxTokensPerStep = 16, BlockSize = 8 });
        var results = await Task.WhenAll(Enumerable.Range(0, n).Select(i =>
            engine.GenerateAsync(tok.Encode(Prompts[i]), null, new SamplingOptions { MaxNewTokens = maxNew[i], EosTokenIds = [] })));
        for (int i = 0; i < n; i++) Assert.True(expected[i].SequenceEqual(results[i].OutputIds), $"{arch} request {i}: expected [{string.Join(",", expected[i])}], got [{string.Join(",", results[i].OutputIds)}]");
    }

    [Theory]
    [InlineData(0, 2048, 16, 0.9)]
    [InlineData(32, 16, 16, 0.9)]        // a budget below the batch
    [InlineData(8, 2048, 12, 0.9)]       // not a power of two
    [InlineData(8, 2048, 16, -1.0)]
    [InlineData(8, 2048, 16, double.NaN)]
    [InlineData(8, 2048, 16, 1e9)]
    public void BadEngineSettingsAreOneLineErrors(int maxBatch, int budget, int blockSize, double kv)
    {
        var ex = Assert.ThrowsAny<LoraKitException>(() =>
            new EngineOptions { MaxBatch = maxBatch, MaxTokensPerStep = budget, BlockSize = blockSize, KvCacheMemory = kv }.Validate());
        Assert.DoesNotContain("\n", ex.Message);
    }

    [Fact]
    public void BlockAllocatorHandsOutEachBlockOnceAndRefusesDoubleFrees()
    {
        var a = new BlockAllocator(5);
        var got = Enumerable.Range(0, 5).Select(_ => a.TryAllocate()).ToList();
        Assert.Equal(5, got.Distinct().Count());
        Assert.Equal(-1, a.TryAllocate());
        a.Release([got[2], got[4]]);
        Assert.Equal(2, a.Free);
        Assert.Throws<InvalidOperationException>(() => a.Release([got[2]]));
        Assert.Contains(a.TryAllocate(), new[] { got[2], got[4] });
    }

    static async Task WaitIdle(InferenceEngine engine)
    {
        // Blocks are freed on the engine thread right after a request completes; give it a moment.
        for (int i = 0; i < 100 && engine.KvBlocksUsed > 0; i++) await Task.Delay(20);
        await engine.RunAsync(_ => true);
    }
}
