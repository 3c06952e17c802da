namespace LoraKit.Serving;

/// <summary>
/// How the serving engine batches and how much memory its KV cache takes. Defaults follow vLLM's where one exists
/// (block size 16, 90% of free device memory for the cache, a per-step token budget that mixes prefill chunks with
/// decode steps).
/// </summary>
public sealed record EngineOptions
{
    /// <summary>Sequences decoded together at most.</summary>
    public int MaxBatch { get; init; } = 16;
    /// <summary>Tokens one step computes at most (decode tokens plus prefill chunks): bounds how long a long prompt holds up the others.</summary>
    public int MaxTokensPerStep { get; init; } = 2048;
    /// <summary>Positions per KV block.</summary>
    public int BlockSize { get; init; } = 16;
    /// <summary>
    /// KV-cache size: a fraction of the device's free memory after the model and adapters are loaded (≤ 1, e.g. 0.9), or
    /// GiB (> 1, e.g. 8). On the CPU a fraction means that much of 1 GiB. The cache never holds more than every running
    /// sequence at full context needs.
    /// </summary>
    public double KvCacheMemory { get; init; } = 0.9;
    /// <summary>Exact number of KV blocks (tests of cache pressure); overrides <see cref="KvCacheMemory"/>.</summary>
    public int? KvCacheBlocks { get; init; }
    /// <summary>Replay decode steps as CUDA graphs when the device and model allow it.</summary>
    public bool CudaGraphs { get; init; } = true;

    public void Validate()
    {
        if (MaxBatch < 1 || MaxBatch > 4096) throw new LoraKitException($"max batch must be between 1 and 4096, not {MaxBatch}");
        if (MaxTokensPerStep < MaxBatch) throw new LoraKitException($"the per-step token budget ({MaxTokensPerStep}) must be at least the max batch ({MaxBatch})");
        if (BlockSize < 1 || BlockSize > 1024 || (BlockSize & (BlockSize - 1)) != 0) throw new LoraKitException($"the KV block size must be a power of two up to 1024, not {BlockSize}");
        if (!(KvCacheMemory > 0) || !double.IsFinite(KvCacheMemory) || KvCacheMemory > 4096) throw new LoraKitException($"--kv-cache-memory must be a fraction in (0, 1] or GiB, not {KvCacheMemory}");
        if (KvCacheBlocks is < 1) throw new LoraKitException("the KV cache needs at least one block");
    }
}
