using LoraKit.Lora;
using LoraKit.Runtime.Cuda;
using LoraKit.Serving.Paged;
using static TorchSharp.torch;

namespace LoraKit.Serving;

/// <summary>
/// Decode steps replayed as CUDA graphs, one per batch-size bucket (powers of two up to the batch limit) and per
/// "any adapter in the batch" (vLLM captures the same buckets). A step's rows are copied into fixed device buffers —
/// token, position, cache slot, block table, key count, adapter slot — padded to the bucket with rows that write to a
/// scratch block no sequence owns, and one launch runs the whole forward to the logits buffer. The host cost of a
/// decode step becomes a few copies and one launch, independent of the model's depth.
/// <para>
/// The rules of <see cref="CudaGraph"/> hold: every buffer exists before the first capture, and nothing long-lived is
/// allocated on the device after it — an adapter load or unload does allocate, so the engine drops every graph then
/// (<see cref="Invalidate"/>) and they are captured again on their next use.
/// </para>
/// </summary>
internal sealed class DecodeGraphs : IDisposable
{
    readonly LoraModel _lm;
    readonly PagedContext _context;
    readonly int _maxRows, _maxBlocks, _scratchBlock, _blockSize;
    readonly Tensor _ids, _positions, _slots, _tables, _lens, _loraSlots, _logits;
    readonly Dictionary<(int Rows, bool Lora), CudaGraph> _graphs = [];
    readonly Dictionary<(int Rows, bool Lora), int> _warm = [];
    readonly Dictionary<int, StepPlan> _plans = [];

    /// <summary>Replays so far, and captures (for reports and tests).</summary>
    public long Replays { get; private set; }
    public long Captures { get; private set; }
    /// <summary>Why graphs are off for good (a capture failed), or null.</summary>
    public string? Disabled { get; private set; }

    public DecodeGraphs(LoraModel lm, PagedContext context, int maxBatch, int scratchBlock)
    {
        (_lm, _context, _scratchBlock, _blockSize) = (lm, context, scratchBlock, context.Cache.BlockSize);
        _maxRows = (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)maxBatch);
        _maxBlocks = (lm.Model.Config.MaxPositionEmbeddings + _blockSize - 1) / _blockSize + 1;
        var dev = lm.Model.Device;
        _ids = zeros([1, _maxRows], ScalarType.Int64, dev);
        _positions = zeros([1, _maxRows], ScalarType.Int64, dev);
        _slots = zeros([_maxRows], ScalarType.Int64, dev);
        _tables = zeros([_maxRows, _maxBlocks], ScalarType.Int32, dev);
        _lens = ones([_maxRows], ScalarType.Int32, dev);
        _loraSlots = zeros([_maxRows], ScalarType.Int64, dev);
        _logits = zeros([_maxRows, lm.Model.Config.VocabSize], lm.Model.DType, dev);
    }

    /// <summary>Drops every graph (after an adapter load or unload allocated device memory).</summary>
    public void Invalidate()
    {
        foreach (var g in _graphs.Values) g.Dispose();
        _graphs.Clear();
        _warm.Clear();
    }

    /// <summary>
    /// Logits [rows, vocab] of a decode-only step (a view of the graphs' output buffer, valid until the next step), or
    /// null when the step is not one a graph runs (prefill chunks, too many rows, a graph that failed to capture).
    /// </summary>
    public Tensor? TryRun(IReadOnlyList<StepWork> work, bool lora)
    {
        if (Disabled is not null || work.Count > _maxRows || work.Any(w => w.Count != 1 || w.Start == 0 || w.BlockTable.Count > _maxBlocks)) return null;
        int rows = (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)work.Count);
        Fill(work, rows, lora);
        var key = (rows, lora);
        if (!_graphs.TryGetValue(key, out var graph))
        {
            // One eager run first: libtorch and cuBLAS set up their handles and workspaces lazily, never inside a capture.
            int runs = _warm.GetValueOrDefault(key);
            _warm[key] = runs + 1;
            if (runs < 1) { Forward(rows, lora); return _logits.narrow(0, 0, work.Count); }
            try { graph = _graphs[key] = CudaGraph.Capture(() => Forward(rows, lora)); Captures++; }
            catch (InvalidOperationException e)
            {
                Disabled = e.InnerException is { } inner ? $"{e.Message}: {inner.Message}" : e.Message;
                return null;
            }
        }
        graph.Replay();
        Replays++;
        return _logits.narrow(0, 0, work.Count);
    }

    void Fill(IReadOnlyList<StepWork> work, int rows, bool lora)
    {
        var ids = new long[rows];
        var pos = new long[rows];
        var slots = new long[rows];
        var lens = new int[rows];
        var lor = new long[rows];
        // Only the columns this step's longest table uses are copied; the kernel reads no further than each row's length.
        int cols = Math.Max(1, work.Max(w => w.BlockTable.Count));
        var tables = new int[rows * cols];
        Array.Fill(tables, _scratchBlock);
        for (int r = 0; r < rows; r++)
        {
            if (r >= work.Count) { slots[r] = (long)_scratchBlock * _blockSize; lens[r] = 1; continue; }
            var w = work[r];
            int p = w.Start;
            ids[r] = w.Tokens[p];
            pos[r] = p;
            slots[r] = (long)w.BlockTable[p / _blockSize] * _blockSize + p % _blockSize;
            lens[r] = w.Context;
            for (int b = 0; b < w.BlockTable.Count; b++) tables[r * cols + b] = w.BlockTable[b];
            lor[r] = lora && w.Adapter is { } a ? _lm.SlotOf(a) : 0;
        }
        using var scope = NewDisposeScope();
        _ids.narrow(1, 0, rows).copy_(tensor(ids).unsqueeze(0));
        _positions.narrow(1, 0, rows).copy_(tensor(pos).unsqueeze(0));
        _slots.narrow(0, 0, rows).copy_(tensor(slots));
        _lens.narrow(0, 0, rows).copy_(tensor(lens));
        _loraSlots.narrow(0, 0, rows).copy_(tensor(lor));
        _tables.narrow(0, 0, rows).narrow(1, 0, cols).copy_(tensor(tables).view(rows, cols));
    }

    /// <summary>The captured work: the forward over the buffers' first <paramref name="rows"/> rows into the logits buffer.</summary>
    void Forward(int rows, bool lora)
    {
        if (!_plans.TryGetValue(rows, out var plan)) plan = _plans[rows] = new StepPlan(rows, _ids, _positions, _slots, _tables, _lens);
        using var scope = NewDisposeScope();
        _context.Plan = plan;
        _lm.SetRowSlots(lora ? _loraSlots.narrow(0, 0, rows) : null);
        try
        {
            var logits = _lm.Model.Logits(plan.Ids, null, null, plan.Positions);   // [1, rows, vocab]
            _logits.narrow(0, 0, rows).copy_(logits[0]);
        }
        finally
        {
            _context.Plan = null;
            _lm.SetRowSlots(null);
        }
    }

    public void Dispose()
    {
        Invalidate();
        foreach (var p in _plans.Values) p.Dispose();
        foreach (var t in new[] { _ids, _positions, _slots, _tables, _lens, _loraSlots, _logits }) t.Dispose();
    }
}
