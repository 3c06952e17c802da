using LoraKit.Serving.Paged;

namespace LoraKit.Serving;

/// <summary>A sequence the KV cache can never hold, even alone.</summary>
public sealed class KvCacheFullException(string message) : LoraKitException(message);

/// <summary>
/// Chooses each step's work under a token budget (vLLM's chunked-prefill scheduler): first one token for every
/// decoding sequence, then the next chunk of sequences still prefilling, then new sequences from the waiting queue,
/// each taking what is left of the budget. Blocks are allocated as sequences grow; when none is free the most recently
/// admitted sequence not in this step is preempted (its blocks freed, recomputed later), so running sequences always
/// progress. Engine thread only.
/// </summary>
internal sealed class Scheduler(EngineOptions o, BlockAllocator blocks, bool chunkPrefill)
{
    public List<EngineSequence> Running { get; } = [];
    public LinkedList<EngineSequence> Waiting { get; } = new();
    /// <summary>Sequences the cache can never hold, with the reason; the engine fails them after <see cref="Next"/>.</summary>
    public List<(EngineSequence Seq, KvCacheFullException Error)> Rejected { get; } = [];

    /// <summary>This step's work: each sequence with the number of its pending tokens to compute.</summary>
    public List<(EngineSequence Seq, int Count)> Next()
    {
        int budget = o.MaxTokensPerStep;
        var work = new List<(EngineSequence Seq, int Count)>();
        // Decoding sequences first: a long prompt never delays their next token by more than its chunk.
        foreach (var seq in Running.Where(s => s.Pending == 1).Concat(Running.Where(s => s.Pending > 1)).ToList())
        {
            if (!Running.Contains(seq)) continue; // preempted for an earlier one in this loop
            int count = Chunk(seq, budget, work.Count == 0);
            if (count == 0) continue;
            if (!Grow(seq, seq.Computed + count, work)) continue;
            work.Add((seq, count));
            budget -= count;
        }
        while (Waiting.First is { } first && Running.Count < o.MaxBatch && budget > 0)
        {
            var seq = first.Value;
            int count = Chunk(seq, budget, work.Count == 0);
            if (count == 0) break;
            int need = BlocksFor(seq.Computed + count) - seq.Blocks.Count;
            if (need > blocks.Total)
            {
                Waiting.RemoveFirst();
                Rejected.Add((seq, new KvCacheFullException(TooLong(seq.Computed + count))));
                continue;
            }
            if (need > blocks.Free) break; // admitted once running sequences free blocks
            Waiting.RemoveFirst();
            Running.Add(seq);
            Grow(seq, seq.Computed + count, work);
            work.Add((seq, count));
            budget -= count;
        }
        return work;
    }

    /// <summary>Removes a finished, cancelled or failed sequence and frees its blocks.</summary>
    public void Retire(EngineSequence seq)
    {
        Running.Remove(seq);
        Waiting.Remove(seq);
        blocks.Release(seq.Blocks);
        seq.Blocks.Clear();
    }

    /// <summary>Blocks in use by running sequences.</summary>
    public int UsedBlocks => blocks.Used;

    int Chunk(EngineSequence seq, int budget, bool alone)
    {
        if (seq.Pending <= budget) return seq.Pending;
        if (chunkPrefill) return budget;
        return alone ? seq.Pending : 0; // LongRoPE prefills a sequence in one piece (its factors depend on the whole length)
    }

    int BlocksFor(int positions) => (positions + o.BlockSize - 1) / o.BlockSize;

    /// <summary>Gives <paramref name="seq"/> blocks for <paramref name="positions"/>; false if it had to be preempted itself.</summary>
    bool Grow(EngineSequence seq, int positions, List<(EngineSequence Seq, int Count)> planned)
    {
        while (seq.Blocks.Count < BlocksFor(positions))
        {
            int b = blocks.TryAllocate();
            if (b >= 0) { seq.Blocks.Add(b); continue; }
            var victim = Running.LastOrDefault(s => s != seq && !planned.Any(p => p.Seq == s));
            if (victim is null)
            {
                if (planned.Count == 0)
                {
                    Retire(seq);
                    Rejected.Add((seq, new KvCacheFullException(TooLong(positions))));
                }
                else Preempt(seq);
                return false;
            }
            Preempt(victim);
        }
        return true;
    }

    /// <summary>Sequences preempted so far (their blocks taken back, recomputed later).</summary>
    public long Preemptions { get; private set; }

    void Preempt(EngineSequence seq)
    {
        Preemptions++;
        Running.Remove(seq);
        blocks.Release(seq.Blocks);
        seq.Blocks.Clear();
        seq.Computed = 0;
        Waiting.AddFirst(seq);
    }

    string TooLong(int positions) =>
        $"the sequence needs {positions} positions, more than the whole KV cache holds ({blocks.Total} blocks of {o.BlockSize}); raise --kv-cache-memory";
}
