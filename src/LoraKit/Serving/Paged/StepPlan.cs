using static TorchSharp.torch;

namespace LoraKit.Serving.Paged;

/// <summary>One sequence's share of a step: <paramref name="Count"/> tokens from position <paramref name="Start"/>.</summary>
/// <param name="Tokens">The sequence's tokens so far (prompt, then output).</param>
/// <param name="BlockTable">Its blocks, enough to hold positions up to Start + Count.</param>
/// <param name="Adapter">Its adapter (null = base model).</param>
public sealed record StepWork(IReadOnlyList<int> Tokens, int Start, int Count, IReadOnlyList<int> BlockTable, string? Adapter)
{
    /// <summary>Keys the last query of this share attends to (every position up to it).</summary>
    public int Context => Start + Count;
}

/// <summary>A prefill chunk inside a packed step: its tokens [TokenStart, TokenStart + Length) and the slots of its whole context.</summary>
public sealed record PrefillSegment(int TokenStart, int Length, int Context, Tensor KeySlots);

/// <summary>
/// Everything one forward of the serving engine needs, built on the host and copied to the device once: the step's
/// tokens packed into one row [1, N] (decode tokens first, one per sequence, then prefill chunks), their positions,
/// the cache slot each token's key and value go to, and for attention the slots each query may read. Sequences
/// never share slots, so a query can only see its own sequence's keys.
/// </summary>
public sealed class StepPlan : IDisposable
{
    public int Tokens { get; }
    /// <summary>The first <see cref="DecodeRows"/> tokens are single-token decode queries, one per sequence.</summary>
    public int DecodeRows { get; }
    public Tensor Ids { get; }          // [1, N] int64
    public Tensor Positions { get; }    // [1, N] int64
    public Tensor SlotMapping { get; }  // [N] int64
    /// <summary>Decode rows' key slots [Bd, Smax] (padded with slot 0) and which of them are real [Bd, 1, 1, Smax].</summary>
    public Tensor? DecodeSlots { get; }
    public Tensor? DecodeKeyMask { get; }
    /// <summary>Decode rows' block tables int32 [Bd, maxBlocks] and key counts int32 [Bd], for the paged-attention kernel.</summary>
    public Tensor? BlockTables { get; }
    public Tensor? SeqLens { get; }
    public IReadOnlyList<PrefillSegment> Prefills { get; }
    /// <summary>Per packed token, its adapter (null = base), for per-token LoRA.</summary>
    public string?[] TokenAdapters { get; }
    /// <summary>For each work item, the packed index of its last token (whose logits predict the next token).</summary>
    public int[] LastTokenIndex { get; }
    /// <summary>The longest context of a decode row (keys per query).</summary>
    public int MaxDecodeContext { get; }

    public StepPlan(IReadOnlyList<StepWork> work, int blockSize, Device device, bool gatherDecode)
    {
        var decode = work.Where(w => w.Count == 1 && w.Start > 0).ToList();
        var prefill = work.Where(w => !(w.Count == 1 && w.Start > 0)).ToList();
        var ordered = decode.Concat(prefill).ToList();
        DecodeRows = decode.Count;
        Tokens = ordered.Sum(w => w.Count);
        var ids = new long[Tokens];
        var pos = new long[Tokens];
        var slots = new long[Tokens];
        TokenAdapters = new string?[Tokens];
        var lastOf = new Dictionary<StepWork, int>(ReferenceEqualityComparer.Instance);
        int n = 0;
        foreach (var w in ordered)
        {
            for (int i = 0; i < w.Count; i++, n++)
            {
                int p = w.Start + i;
                ids[n] = w.Tokens[p];
                pos[n] = p;
                slots[n] = Slot(w.BlockTable, p, blockSize);
                TokenAdapters[n] = w.Adapter;
            }
            lastOf[w] = n - 1;
        }
        LastTokenIndex = work.Select(w => lastOf[w]).ToArray();
        Ids = tensor(ids, device: device).unsqueeze(0);
        Positions = tensor(pos, device: device).unsqueeze(0);
        SlotMapping = tensor(slots, device: device);
        if (decode.Count > 0)
        {
            MaxDecodeContext = decode.Max(w => w.Context);
            int maxBlocks = decode.Max(w => w.BlockTable.Count);
            var tables = new int[decode.Count * maxBlocks];
            for (int r = 0; r < decode.Count; r++)
                for (int b = 0; b < decode[r].BlockTable.Count; b++) tables[r * maxBlocks + b] = decode[r].BlockTable[b];
            BlockTables = tensor(tables, device: device).view(decode.Count, maxBlocks);
            SeqLens = tensor(decode.Select(w => w.Context).ToArray(), device: device);
            if (gatherDecode) (DecodeSlots, DecodeKeyMask) = DecodeGather(decode, blockSize, device);
        }
        Prefills = PrefillSegments(prefill, DecodeRows, blockSize, device);
    }

    /// <summary>
    /// A decode-only plan over fixed device buffers (a CUDA graph's inputs, refilled before each replay): rows
    /// [0, <paramref name="rows"/>) of each buffer, attention through the kernel.
    /// </summary>
    public StepPlan(int rows, Tensor ids, Tensor positions, Tensor slotMapping, Tensor blockTables, Tensor seqLens)
    {
        (Tokens, DecodeRows) = (rows, rows);
        // Views that live as long as the graph that reads them, whatever dispose scope the caller runs in.
        Ids = ids.narrow(1, 0, rows).DetachFromDisposeScope();
        Positions = positions.narrow(1, 0, rows).DetachFromDisposeScope();
        SlotMapping = slotMapping.narrow(0, 0, rows).DetachFromDisposeScope();
        BlockTables = blockTables.narrow(0, 0, rows).DetachFromDisposeScope();
        SeqLens = seqLens.narrow(0, 0, rows).DetachFromDisposeScope();
        Prefills = [];
        TokenAdapters = new string?[rows];
        LastTokenIndex = Enumerable.Range(0, rows).ToArray();
    }

    static long Slot(IReadOnlyList<int> table, int position, int blockSize) =>
        (long)table[position / blockSize] * blockSize + position % blockSize;

    (Tensor slots, Tensor mask) DecodeGather(List<StepWork> decode, int blockSize, Device device)
    {
        int s = MaxDecodeContext;
        var slots = new long[decode.Count * s];
        var mask = new bool[decode.Count * s];
        for (int r = 0; r < decode.Count; r++)
            for (int p = 0; p < decode[r].Context; p++)
            {
                slots[r * s + p] = Slot(decode[r].BlockTable, p, blockSize);
                mask[r * s + p] = true;
            }
        return (tensor(slots, device: device).view(decode.Count, s), tensor(mask, device: device).view(decode.Count, 1, 1, s));
    }

    static List<PrefillSegment> PrefillSegments(List<StepWork> prefill, int start, int blockSize, Device device)
    {
        var segments = new List<PrefillSegment>();
        foreach (var w in prefill)
        {
            var keys = new long[w.Context];
            for (int p = 0; p < keys.Length; p++) keys[p] = Slot(w.BlockTable, p, blockSize);
            segments.Add(new PrefillSegment(start, w.Count, w.Context, tensor(keys, device: device)));
            start += w.Count;
        }
        return segments;
    }

    public void Dispose()
    {
        Ids.Dispose(); Positions.Dispose(); SlotMapping.Dispose();
        DecodeSlots?.Dispose(); DecodeKeyMask?.Dispose(); BlockTables?.Dispose(); SeqLens?.Dispose();
        foreach (var s in Prefills) s.KeySlots.Dispose();
    }
}
