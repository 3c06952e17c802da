using LoraKit.Generation;
using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// The batched generator and scorer at their edges, against the one-sequence paths: no rows, a token budget smaller
/// than one row, rows of very different prompt lengths that run into the context limit in one batch (the batch's mask
/// grows past the context while each row stays within it), a row asking for no new tokens, an empty continuation.
/// </summary>
public class BatchEdgeTests
{
    [Fact]
    public void NoRowsGiveNoResults()
    {
        using var model = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        Assert.Empty(BatchGenerator.Generate(model, tok, []));
        Assert.Empty(ContinuationScorer.Score(model, []));
    }

    [Fact]
    public void TinyBudgetsAndRowsRunningIntoTheContextEqualOneSequenceGeneration()
    {
        using var model = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        int context = model.Config.MaxPositionEmbeddings;
        var longPrompt = tok.Encode(string.Join(" ", Enumerable.Repeat("alpha beta", 12)));
        Assert.InRange(longPrompt.Length, 20, context - 10);
        // No EOS: every row decodes until its budget or the context ends it.
        var rows = new List<(int[], SamplingOptions)>
        {
            (tok.Encode("x"), new SamplingOptions { MaxNewTokens = context, EosTokenIds = [-1] }),
            (longPrompt, new SamplingOptions { MaxNewTokens = context, EosTokenIds = [-1] }),
            (tok.Encode("Hello"), new SamplingOptions { MaxNewTokens = 3, EosTokenIds = [-1] }),
        };
        var single = rows.Select(r => new TextGenerator(model, tok).Generate(r.Item1, r.Item2)).ToList();
        foreach (int budget in new[] { 1, 16_384 })
        {
            var batched = BatchGenerator.Generate(model, tok, rows, maxBatch: 8, maxBatchTokens: budget);
            for (int i = 0; i < rows.Count; i++)
            {
                Assert.Equal(single[i].OutputIds, batched[i].OutputIds);
                Assert.Equal(single[i].FinishReason, batched[i].FinishReason);
            }
        }
        Assert.True(single[1].OutputIds.Length + longPrompt.Length <= context);
    }

    [Fact]
    public void AnEmptyContinuationScoresZeroOverZeroTokens()
    {
        using var model = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var ids = tok.Encode("The sky is blue");
        var scores = ContinuationScorer.Score(model, [(ids, []), (ids[..1], ids[1..])], maxBatchTokens: 1);
        Assert.Equal(new LogLikelihood(0, 0), scores[0]);
        Assert.Equal(ids.Length - 1, scores[1].Tokens);
        Assert.True(scores[1].Sum < 0);
    }
}
