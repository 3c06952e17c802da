using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Generation;

/// <summary>
/// Generates for many prompts at once, as evaluation needs (all prompts known up front, unlike serving): prompts are
/// sorted by their new-token budget, then length, and cut into batches under a row and token budget; each batch is prefilled in one forward
/// (left-padded, padding masked, positions counted per row) and decoded one step for all rows at a time, with one
/// device→host copy per step for the greedy rows. Rows that finish leave the batch. Each row keeps its own
/// <see cref="SamplingOptions"/> (and so its own seed), so a row's tokens do not depend on its batch-mates beyond
/// floating-point rounding of the batched matmuls. One dispose scope per step keeps native memory flat.
/// </summary>
public static class BatchGenerator
{
    /// <summary>Generations for <paramref name="rows"/>, in their order; <paramref name="onDone"/> is called once per finished row.</summary>
    public static GenerationResult[] Generate(CausalLM model, Tokenizer tokenizer, IReadOnlyList<(int[] Prompt, SamplingOptions Options)> rows,
        int maxBatch = 32, int maxBatchTokens = 16_384, Action? onDone = null)
    {
        if (maxBatch < 1) throw new ArgumentException("the batch size must be at least 1");
        int context = model.Config.MaxPositionEmbeddings;
        foreach (var (p, o) in rows)
        {
            if (p.Length == 0) throw new ArgumentException("a prompt encodes to no tokens; nothing to condition on");
            SequenceState.CheckPromptFits(p.Length, context);
            o.Validate();
        }
        var results = new GenerationResult[rows.Count];
        var single = new TextGenerator(model, tokenizer);
        // Batches of similar length budgets: a batch decodes until its longest row is done, so rows asking for 16 tokens
        // beside rows asking for 64 would idle; within a budget, similar prompt lengths keep left padding short.
        var order = Enumerable.Range(0, rows.Count).OrderBy(i => rows[i].Options.MaxNewTokens).ThenBy(i => rows[i].Prompt.Length).ToList();
        var batch = new List<int>();
        void Flush()
        {
            if (batch.Count > 0) RunBatch(model, tokenizer, rows, batch, results, onDone);
            batch.Clear();
        }
        foreach (int i in order)
        {
            var (p, o) = rows[i];
            if (o.MaxNewTokens == 0 || LongRopeRecompute.Due(model.Config, 1, p.Length + o.MaxNewTokens))
            {
                // Phi-3 LongRoPE rows that cross original_max_position_embeddings recompute their cache at the crossing;
                // they go through the one-sequence generator, which does exactly that.
                results[i] = single.Generate(p, o);
                onDone?.Invoke();
                continue;
            }
            long span = batch.Count == 0 ? p.Length + o.MaxNewTokens
                : Math.Max(p.Length, batch.Max(b => rows[b].Prompt.Length)) + o.MaxNewTokens; // sorted by budget: this one's is the largest
            if (batch.Count == maxBatch || (batch.Count + 1) * span > maxBatchTokens) Flush();
            batch.Add(i);
        }
        Flush();
        return results;
    }

    static void RunBatch(CausalLM model, Tokenizer tokenizer, IReadOnlyList<(int[] Prompt, SamplingOptions Options)> rows,
        List<int> members, GenerationResult[] results, Action? onDone)
    {
        int context = model.Config.MaxPositionEmbeddings;
        var live = members.Select(i => (index: i, state: new SequenceState(rows[i].Prompt, rows[i].Options, tokenizer, null, context))).ToList();
        using var cache = new KvCache(model.Config.NumHiddenLayers);
        using var _ = no_grad();
        Tensor? mask = null;
        try
        {
            mask = Prefill(model, live.Select(r => r.state).ToList(), cache, out var last);
            while (true)
            {
                using var scope = NewDisposeScope();
                Accept(live.Select(r => r.state).ToList(), last);
                last.Dispose();
                var keep = new List<long>();
                for (int r = 0; r < live.Count; r++)
                {
                    if (!live[r].state.Finished) { keep.Add(r); continue; }
                    results[live[r].index] = live[r].state.Result();
                    onDone?.Invoke();
                }
                if (keep.Count == 0) return;
                if (keep.Count < live.Count)
                {
                    var idx = tensor(keep.ToArray(), device: mask.device);
                    cache.SelectRows(idx);
                    var kept = mask.index_select(0, idx).DetachFromDisposeScope();
                    mask.Dispose();
                    mask = kept;
                    live = keep.Select(r => live[(int)r]).ToList();
                }
                var ids = tensor(live.Select(r => (long)r.state.LastToken).ToArray(), device: model.Device).unsqueeze(1);
                var full = cat([mask, ones(live.Count, 1, ScalarType.Int64, mask.device)], 1).DetachFromDisposeScope();
                mask.Dispose();
                mask = full;
                last = model.Logits(ids, mask, cache)[.., -1].DetachFromDisposeScope();
            }
        }
        finally { mask?.Dispose(); }
    }

    /// <summary>One forward over the left-padded prompts; returns the mask [B, S] and the last position's logits [B, vocab].</summary>
    static Tensor Prefill(CausalLM model, List<SequenceState> states, KvCache cache, out Tensor last)
    {
        using var scope = NewDisposeScope();
        int s = states.Max(x => x.PromptIds.Length);
        var ids = states.SelectMany(x => Enumerable.Repeat(0L, s - x.PromptIds.Length).Concat(x.PromptIds.Select(v => (long)v))).ToArray();
        var mask = states.SelectMany(x => Enumerable.Repeat(0L, s - x.PromptIds.Length).Concat(Enumerable.Repeat(1L, x.PromptIds.Length))).ToArray();
        var maskT = tensor(mask, device: model.Device).reshape(states.Count, s);
        var logits = model.Logits(tensor(ids, device: model.Device).reshape(states.Count, s), maskT, cache);
        last = logits[.., -1].MoveToOuterDisposeScope();
        return maskT.MoveToOuterDisposeScope();
    }

    /// <summary>Every row's next token: greedy rows from one argmax copied to the host at once, sampled rows one by one.</summary>
    static void Accept(List<SequenceState> states, Tensor last)
    {
        long[] greedy = states.Any(s => s.IsGreedy) ? last.argmax(1).cpu().data<long>().ToArray() : [];
        for (int r = 0; r < states.Count; r++)
        {
            if (states[r].IsGreedy) states[r].Accept((int)greedy[r]);
            else states[r].Step(last[r]);
        }
    }
}
