using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Generation;

/// <summary>The summed log-probability of a continuation's tokens after its context, and how many tokens it has.</summary>
public readonly record struct LogLikelihood(double Sum, int Tokens)
{
    /// <summary>Mean negative log-likelihood per token (perplexity is its exp).</summary>
    public double MeanNll => Tokens == 0 ? 0 : -Sum / Tokens;
}

/// <summary>
/// Scores continuations without generating (multiple-choice answers, perplexity texts), as lm-evaluation-harness'
/// loglikelihood requests do: context and continuation are concatenated, and the log-softmax (fp32) of the logits at
/// each continuation position gives that token's log-probability. Rows are batched under a token budget and
/// right-padded: causal attention never lets a real position see the padding after it, so no mask is needed. Only
/// the continuation positions go through the LM head (a [B, S, vocab] logits tensor would be the largest of all).
/// </summary>
public static class ContinuationScorer
{
    /// <summary>One <see cref="LogLikelihood"/> per (context, continuation) row, in order; the context must be non-empty.</summary>
    public static LogLikelihood[] Score(CausalLM model, IReadOnlyList<(int[] Context, int[] Continuation)> rows, int maxBatchTokens = 8_192, Action? onDone = null)
    {
        int limit = model.Config.MaxPositionEmbeddings;
        foreach (var (c, x) in rows)
        {
            if (c.Length == 0) throw new ArgumentException("a scored continuation needs at least one context token");
            if (c.Length + x.Length > limit)
                throw new LoraKitException($"context and continuation have {c.Length + x.Length} tokens; the model's limit (max_position_embeddings) is {limit}");
        }
        var results = new LogLikelihood[rows.Count];
        var order = Enumerable.Range(0, rows.Count).OrderBy(i => rows[i].Context.Length + rows[i].Continuation.Length).ToList();
        var batch = new List<int>();
        foreach (int i in order)
        {
            int len = rows[i].Context.Length + rows[i].Continuation.Length;
            if (batch.Count > 0 && (batch.Count + 1) * len > maxBatchTokens) { RunBatch(model, rows, batch, results, onDone); batch.Clear(); }
            batch.Add(i);
        }
        if (batch.Count > 0) RunBatch(model, rows, batch, results, onDone);
        return results;
    }

    static void RunBatch(CausalLM model, IReadOnlyList<(int[] Context, int[] Continuation)> rows, List<int> members, LogLikelihood[] results, Action? onDone)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        int s = members.Max(i => rows[i].Context.Length + rows[i].Continuation.Length);
        var ids = new long[members.Count * s];
        var flat = new List<long>();    // [B·S] index of each position that predicts a continuation token
        var targets = new List<long>();
        var owner = new List<int>();    // which member each scored position belongs to
        for (int m = 0; m < members.Count; m++)
        {
            var (c, x) = rows[members[m]];
            for (int t = 0; t < c.Length; t++) ids[m * s + t] = c[t];
            for (int t = 0; t < x.Length; t++)
            {
                ids[m * s + c.Length + t] = x[t];
                flat.Add(m * s + c.Length + t - 1); // the position before a token predicts it
                targets.Add(x[t]);
                owner.Add(m);
            }
        }
        var sums = new double[members.Count];
        if (flat.Count > 0)
        {
            var picked = model.LogitsAt(tensor(ids, device: model.Device).reshape(members.Count, s), tensor(flat.ToArray(), device: model.Device));
            var logp = picked.to(ScalarType.Float32).log_softmax(1)
                .gather(1, tensor(targets.ToArray(), device: model.Device).unsqueeze(1)).squeeze(1).cpu().data<float>().ToArray();
            for (int k = 0; k < logp.Length; k++) sums[owner[k]] += logp[k];
        }
        for (int m = 0; m < members.Count; m++)
        {
            results[members[m]] = new LogLikelihood(sums[m], rows[members[m]].Continuation.Length);
            onDone?.Invoke();
        }
    }
}
