using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Serving.Paged;

/// <summary>
/// Keys and values of every running sequence in fixed-size blocks preallocated once (vLLM's PagedAttention layout):
/// per layer one K and one V tensor [blocks, blockSize, kvHeads, headDim]. A sequence's position p lives in block
/// table[p / blockSize], row p % blockSize; its "slot" is block·blockSize + row in the flattened view. Nothing is
/// concatenated, padded or copied when sequences join or leave: only the block tables change.
/// </summary>
public sealed class PagedKvCache : IDisposable
{
    readonly Tensor[] _k, _v;

    public int Blocks { get; }
    public int BlockSize { get; }
    public int KvHeads { get; }
    public int HeadDim { get; }
    public BlockAllocator Allocator { get; }

    public PagedKvCache(ModelConfig c, int blocks, int blockSize, ScalarType dtype, Device device)
    {
        if (blockSize < 1 || (blockSize & (blockSize - 1)) != 0) throw new ArgumentException($"the KV block size must be a power of two, not {blockSize}");
        (Blocks, BlockSize, KvHeads, HeadDim) = (blocks, blockSize, c.NumKeyValueHeads, c.HeadDim);
        _k = new Tensor[c.NumHiddenLayers];
        _v = new Tensor[c.NumHiddenLayers];
        for (int i = 0; i < _k.Length; i++)
        {
            _k[i] = zeros([blocks, blockSize, KvHeads, HeadDim], dtype, device);
            _v[i] = zeros([blocks, blockSize, KvHeads, HeadDim], dtype, device);
        }
        Allocator = new BlockAllocator(blocks);
    }

    /// <summary>Bytes one cached position takes over all layers (K and V).</summary>
    public static long BytesPerToken(ModelConfig c, ScalarType dtype) =>
        2L * c.NumHiddenLayers * c.NumKeyValueHeads * c.HeadDim * ElementSize(dtype);

    static long ElementSize(ScalarType t) => t switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float16 or ScalarType.BFloat16 => 2,
        _ => 4,
    };

    /// <summary>Layer <paramref name="layer"/>'s key blocks [blocks, blockSize, kvH, D].</summary>
    public Tensor Keys(int layer) => _k[layer];
    public Tensor Values(int layer) => _v[layer];

    /// <summary>Writes this step's keys and values [N, kvH, D] of one layer into their slots [N] (int64).</summary>
    public void Write(int layer, Tensor slots, Tensor k, Tensor v)
    {
        using var scope = NewDisposeScope();
        _k[layer].view(-1, KvHeads, HeadDim).index_copy_(0, slots, k);
        _v[layer].view(-1, KvHeads, HeadDim).index_copy_(0, slots, v);
    }

    /// <summary>Keys and values at the given slots (any shape S…), as [S…, kvH, D].</summary>
    public (Tensor k, Tensor v) Gather(int layer, Tensor slots)
    {
        var flat = slots.reshape(-1);
        var shape = slots.shape.Concat([(long)KvHeads, HeadDim]).ToArray();
        return (_k[layer].view(-1, KvHeads, HeadDim).index_select(0, flat).view(shape),
                _v[layer].view(-1, KvHeads, HeadDim).index_select(0, flat).view(shape));
    }

    public void Dispose()
    {
        foreach (var t in _k) t.Dispose();
        foreach (var t in _v) t.Dispose();
    }
}
