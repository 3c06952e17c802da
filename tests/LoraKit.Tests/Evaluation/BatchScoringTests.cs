using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;
using TorchSharp;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// The evaluation's batched paths against the one-sequence paths that are checked against transformers
/// (<see cref="TextGenerator"/>: greedy ids equal transformers' generate; <see cref="CausalLM.Loss"/>: transformers' loss):
/// batching, left padding, retiring rows and scoring only chosen positions must change nothing.
/// </summary>
public class BatchScoringTests
{
    static readonly string[] Prompts =
    [
        "The quick brown fox", "Hello", "A much longer prompt that takes more tokens than the others do, by far",
        "1 2 3 4", "Once upon a time there was", "x",
    ];

    [Theory]
    [InlineData("llama")]
    [InlineData("qwen2")]
    [InlineData("gemma2")] // sliding-window layers and soft-capping under a left-padding mask
    [InlineData("phi3")]
    public void BatchedGreedyEqualsOneSequenceGeneration(string arch)
    {
        using var model = CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        var rows = Prompts.Select((p, i) => (tok.Encode(p), new SamplingOptions { MaxNewTokens = 3 + 4 * i, EosTokenIds = [tok.EosTokenId ?? -1] })).ToList();
        var single = rows.Select(r => new TextGenerator(model, tok).Generate(r.Item1, r.Item2)).ToList();
        foreach (int batch in new[] { 1, 2, 4, 32 })
        {
            var batched = BatchGenerator.Generate(model, tok, rows, maxBatch: batch);
            for (int i = 0; i < rows.Count; i++)
            {
                Assert.Equal(single[i].OutputIds, batched[i].OutputIds);
                Assert.Equal(single[i].Text, batched[i].Text);
                Assert.Equal(single[i].FinishReason, batched[i].FinishReason);
            }
        }
    }

    [Fact]
    public void SampledRowsFollowTheirOwnSeed()
    {
        using var model = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var opts = new SamplingOptions { MaxNewTokens = 8, Temperature = 1.0, Seed = 7 };
        var alone = BatchGenerator.Generate(model, tok, [(tok.Encode("Hello"), opts)]);
        var crowd = BatchGenerator.Generate(model, tok, [(tok.Encode("Hello"), opts), (tok.Encode("Other text"), opts with { Seed = 8 }), (tok.Encode("x"), new SamplingOptions { MaxNewTokens = 2 })]);
        Assert.Equal(alone[0].OutputIds, crowd[0].OutputIds);
        Assert.Equal(new TextGenerator(model, tok).Generate(tok.Encode("Hello"), opts).OutputIds, alone[0].OutputIds);
    }

    [Theory]
    [InlineData("llama")]
    [InlineData("gemma2")]
    public void ContinuationLogLikelihoodsAgreeWithTheModelsLoss(string arch)
    {
        // Sum of log p over a whole text = -(n-1)·loss(text); a continuation's sum is the whole's minus its context's.
        using var model = CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        double SumLogP(int[] ids)
        {
            using var _ = no_grad();
            return ids.Length < 2 ? 0 : -(ids.Length - 1) * model.Loss(tensor(ids.Select(x => (long)x).ToArray()).unsqueeze(0)).item<float>();
        }
        var rows = new List<(int[], int[])>();
        foreach (var p in Prompts)
        {
            var ids = tok.Encode(p + " and then some more words");
            var ctx = tok.Encode(p);
            if (ctx.Length >= ids.Length || !ids.Take(ctx.Length).SequenceEqual(ctx)) ctx = ids[..Math.Max(1, ids.Length / 2)];
            rows.Add((ctx, ids[ctx.Length..]));
        }
        foreach (int budget in new[] { 1, 40, 8192 })
        {
            var scores = ContinuationScorer.Score(model, rows, maxBatchTokens: budget);
            for (int i = 0; i < rows.Count; i++)
            {
                var (ctx, cont) = rows[i];
                double expected = SumLogP([.. ctx, .. cont]) - SumLogP(ctx);
                Assert.Equal(cont.Length, scores[i].Tokens);
                Assert.True(Math.Abs(scores[i].Sum - expected) <= 1e-4 * Math.Max(1, Math.Abs(expected)), $"{arch} row {i}: {scores[i].Sum} vs {expected}");
            }
        }
    }

    [Fact]
    public void BatchedGenerationWithAnAdapterEqualsOneSequence()
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        AdapterFiles.Load(lm, "a", Fixtures.Path_("adapters", "llama", "a"));
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var rows = Prompts.Select(p => (tok.Encode(p), new SamplingOptions { MaxNewTokens = 6 })).ToList();
        var single = rows.Select(r => new TextGenerator(lm.Model, tok).Generate(r.Item1, r.Item2).OutputIds).ToList();
        var batched = BatchGenerator.Generate(lm.Model, tok, rows);
        Assert.Equal(single, batched.Select(b => b.OutputIds).ToList());
    }

    [Fact]
    public void NativeTensorCountStaysFlatAcrossBatchesAndScoring()
    {
        using var model = CausalLM.Load(Fixtures.Model("qwen2"), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        List<(int[], SamplingOptions)> Rows(int n, int tokens) => Prompts.Select((p, i) => (tok.Encode(p),
            new SamplingOptions { MaxNewTokens = tokens + i, Temperature = i % 2, Seed = i })).Take(n).ToList();
        var scored = Prompts.Select(p => (tok.Encode(p + " and more"), tok.Encode(" words here", addSpecialTokens: false))).ToList();
        BatchGenerator.Generate(model, tok, Rows(2, 2), maxBatch: 2); // warm-up
        ContinuationScorer.Score(model, scored);
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        BatchGenerator.Generate(model, tok, Rows(3, 4), maxBatch: 2);
        ContinuationScorer.Score(model, scored.Take(2).ToList(), maxBatchTokens: 16);
        long afterShort = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        BatchGenerator.Generate(model, tok, Rows(6, 40), maxBatch: 4);
        ContinuationScorer.Score(model, scored, maxBatchTokens: 64);
        long afterLong = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        using (var probe = zeros(3)) // the counter does see live tensors, so equality below is meaningful
            Assert.Equal(afterLong + 1, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        Assert.Equal(before, afterShort);
        Assert.Equal(before, afterLong);
    }
}
