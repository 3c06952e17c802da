using LoraKit.Models;
using LoraKit.Serving.Paged;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Serving;

/// <summary>How many KV blocks the engine preallocates (see <see cref="EngineOptions.KvCacheMemory"/>).</summary>
public static class KvCacheSizing
{
    const long Gib = 1L << 30;

    public static int Blocks(EngineOptions o, ModelConfig c, ScalarType dtype, Device device)
    {
        if (o.KvCacheBlocks is int exact) return exact;
        long perBlock = PagedKvCache.BytesPerToken(c, dtype) * o.BlockSize;
        // Never more than every running sequence at full context (plus one block each for the token being added).
        long needed = (long)o.MaxBatch * (c.MaxPositionEmbeddings / o.BlockSize + 2);
        long budget = o.KvCacheMemory > 1 ? (long)(o.KvCacheMemory * Gib) : (long)(o.KvCacheMemory * Available(device));
        long blocks = Math.Min(needed, budget / perBlock);
        if (blocks < 1)
            throw new LoraKitException($"the KV cache budget ({budget / (double)Gib:0.##} GiB) holds no block of {o.BlockSize} positions " +
                                       $"({perBlock / (double)(1 << 20):0.##} MiB each); raise --kv-cache-memory");
        return (int)Math.Min(blocks, int.MaxValue / 2);
    }

    static long Available(Device device)
    {
        if (device.type == TorchSharp.DeviceType.CUDA && CudaFreeMemory.Read() is { } m) return m.Free;
        return Gib;
    }
}
