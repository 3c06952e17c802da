using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// A frozen base linear layer plus any number of named adapters (PEFT's lora.Linear), each a plain LoRA or a variant
/// (<see cref="ILoraVariant"/>): y = base(x) + Σ_active variant term (plain: s·B(A(dropout(x)))). Adapters are kept in
/// fp32 and computed on an fp32 copy of x, the sum cast back to the base output's dtype. Their tensors are registered
/// parameters under PEFT's names (lora_A.&lt;adapter&gt;.weight, lora_B.&lt;adapter&gt;.weight,
/// lora_magnitude_vector.&lt;adapter&gt;.weight). Merging puts an adapter into the base weight through its variant
/// (computed in fp32 from <see cref="DeltaWeight"/>, committed only if finite); unmerging takes them out again, last
/// merged first. Three strategies compute the same terms: the reference loop (PEFT's numerics), the training fast path
/// in the input's dtype (<see cref="ComputeInInputDtype"/>, plain terms only) and per-row serving (<see cref="RowAdapters"/>).
/// </summary>
public sealed class LoraLinear : nn.Module<Tensor, Tensor>
{
#pragma warning disable IDE1006 // PEFT's module names, so paths read model.layers.0.self_attn.q_proj.base_layer, ….lora_A.default.weight
    /// <summary>The wrapped frozen layer.</summary>
    public Models.Linear base_layer;
    /// <summary>Each adapter's A, by adapter name.</summary>
    public AdapterSlots lora_A = new();
    /// <summary>Each adapter's B, by adapter name.</summary>
    public AdapterSlots lora_B = new();
    /// <summary>Each DoRA adapter's magnitude, by adapter name.</summary>
    public AdapterSlots lora_magnitude_vector = new();
#pragma warning restore IDE1006
    readonly Dictionary<string, LoraWeights> _adapters = new(StringComparer.Ordinal);
    readonly Stack<string> _merged = new();

    /// <summary>Wraps <paramref name="baseLayer"/> with no adapters yet.</summary>
    public LoraLinear(Models.Linear baseLayer) : base("LoraLinear")
    {
        base_layer = baseLayer;
        RegisterComponents();
    }

    /// <summary>The adapters on this layer by name.</summary>
    public IReadOnlyDictionary<string, LoraWeights> Adapters => _adapters;
    /// <summary>Adapters applied in forward (ignored while <see cref="Disabled"/>).</summary>
    public List<string> Active { get; } = [];
    /// <summary>While true the layer computes the base layer alone (PEFT's disable_adapter).</summary>
    public bool Disabled { get; set; }
    /// <summary>
    /// Serving: the adapter of each batch row (null = base model). When set, it replaces <see cref="Active"/>: plain
    /// adapters' rows go through one gathered batched GEMM pair (BGMV, as in Punica/S-LoRA), other variants' rows
    /// through their own forward (PEFT's mixed-batch forward).
    /// </summary>
    public string?[]? RowAdapters { get; set; }
    /// <summary>The adapters merged into the base weight, the most recent first.</summary>
    public IReadOnlyCollection<string> Merged => _merged;
    /// <summary>
    /// Training fast path: compute the adapters in the input's dtype (bf16 on GPUs) instead of on an fp32 copy of x.
    /// Autograd then keeps x itself (shared by q/k/v and by gate/up) rather than one fp32 copy per module, and the
    /// branch is two small matmuls, the second adding into the base output (addmm). The fp32 weights stay the master copy
    /// (their casts are tiny and differentiable). Off by default: PEFT's fp32 branch is the reference numerics.
    /// </summary>
    public bool ComputeInInputDtype { get; set; }

    /// <summary>
    /// Adds (or replaces) adapter <paramref name="name"/>, registering its tensors; the variant derives what it needs
    /// from the base layer first (DoRA without a loaded magnitude: m = ‖W + s·B·A‖).
    /// </summary>
    public void AddAdapter(string name, LoraWeights w)
    {
        if (w.A.shape[1] != base_layer.InFeatures || w.B.shape[0] != base_layer.OutFeatures || w.B.shape[1] != w.A.shape[0])
            throw new ArgumentException($"adapter '{name}' shapes A{Shape(w.A)} B{Shape(w.B)} do not fit a layer {base_layer.InFeatures}→{base_layer.OutFeatures}");
        if (_merged.Contains(name)) throw new InvalidOperationException($"adapter '{name}' is merged; unmerge before replacing it");
        w.Variant.Init(base_layer, w);
        if (w.Magnitude is { } m && !m.shape.SequenceEqual([base_layer.OutFeatures]))
            throw new ArgumentException($"adapter '{name}' magnitude {Shape(m)} does not fit a layer with {base_layer.OutFeatures} outputs");
        Unregister(name);
        _adapters[name] = w;
        lora_A.Set(name, w.AFactor);
        lora_B.Set(name, w.BFactor);
        if (w.MagnitudeFactor is { } mf) lora_magnitude_vector.Set(name, mf);
    }

    /// <summary>Removes adapter <paramref name="name"/> (it must not be merged) and frees its tensors.</summary>
    public void RemoveAdapter(string name)
    {
        if (_merged.Contains(name)) throw new InvalidOperationException($"adapter '{name}' is merged; unmerge before removing it");
        Unregister(name);
        Active.Remove(name);
    }

    void Unregister(string name)
    {
        if (!_adapters.Remove(name, out var old)) return;
        lora_A.Remove(name);
        lora_B.Remove(name);
        lora_magnitude_vector.Remove(name);
        old.Dispose();
    }

    static string Shape(Tensor t) => "[" + string.Join(", ", t.shape) + "]";

    /// <summary>Where dropout masks come from while training (a run's own seeded stream); null: torch's global generator.</summary>
    public Runtime.RngStream? Rng { get; set; }

    /// <summary>y = base(x) + the active adapters' terms, by the strategy the layer's settings select.</summary>
    public override Tensor forward(Tensor x)
    {
        // Training fast path: the fused autograd function, which hand-writes s·B·A·x and its backward (plain terms only).
        // A packed (quantized) base is dequantized per GEMM inside it (FrozenWeight).
        if (ComputeInInputDtype && TrySingleAdapter(out var single) && single != null)
            return training && is_grad_enabled() ? LoraProjection.Apply(x, base_layer, single) : SingleInInputDtype(x, single);
        var result = base_layer.forward(x);
        if (RowSlots is { } slots && RowAdapters is null && !Disabled) return Gathered(x, result, slots);
        if (RowAdapters is { } rows && !Disabled) return rows.Length == x.shape[0] ? PerRow(x, result, rows) : PerToken(x, result, rows);
        if (Disabled || Active.Count == 0) return result;
        if (ComputeInInputDtype && LiveAdapters().All(w => w.Variant.IsPlainTerm)) return InInputDtype(x, result);
        return Reference(x, result);
    }

    /// <summary>PEFT's loop: each live adapter's variant adds its term, computed on an fp32 copy of x; cast back once.</summary>
    Tensor Reference(Tensor x, Tensor result)
    {
        using var scope = NewDisposeScope();
        var dtype = result.dtype;
        var acc = result;
        foreach (var w in LiveAdapters())
            acc = w.Variant.Forward(base_layer, w, x.to(w.A.dtype), acc, DropoutFor(w));
        return acc.to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>The active adapters not merged into the base weight, in activation order.</summary>
    IEnumerable<LoraWeights> LiveAdapters()
    {
        foreach (var name in Active)
            if (!_merged.Contains(name)) yield return _adapters[name];
    }

    /// <summary>The dropout this adapter applies now (null in eval mode or at p = 0), drawing from <see cref="Rng"/>.</summary>
    Func<Tensor, Tensor>? DropoutFor(LoraWeights w) =>
        w.Dropout > 0 && training ? h => Rng is { } rng ? rng.Dropout(h, w.Dropout) : nn.functional.dropout(h, w.Dropout, training: true) : null;

    /// <summary>
    /// One adapter in the input's dtype without gradients (evaluation inside a fast-path run), computed as
    /// <see cref="LoraProjection"/>'s forward does, so the [tokens, out] output is written once.
    /// </summary>
    Tensor SingleInInputDtype(Tensor x, LoraWeights w)
    {
        using var scope = NewDisposeScope();
        var x2 = x.reshape(-1, x.shape[^1]);
        var down = nn.functional.linear(x2, w.A.to(x.dtype));                                // [N, r]
        var shape = x.shape.ToArray();
        shape[^1] = base_layer.OutFeatures;
        return LoraProjection.Compute(x2, down, w.B.Times(w.Scaling).to(x.dtype), base_layer).view(shape).MoveToOuterDisposeScope();
    }

    Tensor InInputDtype(Tensor x, Tensor result)
    {
        using var scope = NewDisposeScope();
        var x2 = x.reshape(-1, x.shape[^1]);
        var acc = result.reshape(-1, result.shape[^1]);
        foreach (var w in LiveAdapters())
            acc = w.AddTerm(acc, DropoutFor(w) is { } drop ? drop(x2) : x2); // base + s·(x·Aᵀ)·Bᵀ in x's dtype
        return acc.view(result.shape).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The one adapter a fused training kernel may fold in: exactly one active and unmerged, without dropout in training,
    /// a plain term (a variant such as DoRA makes this false, and the reference path runs); null weights: none live.
    /// </summary>
    public bool TrySingleAdapter(out LoraWeights? weights)
    {
        weights = null;
        if (Disabled || RowAdapters != null) return false;
        foreach (var name in Active) // runs for every module on every step: no LINQ allocations
        {
            if (_merged.Contains(name)) continue;
            if (weights != null) { weights = null; return false; } // a second live adapter
            weights = _adapters[name];
        }
        if (weights is { Variant.IsPlainTerm: false }) { weights = null; return false; }
        return weights is null || weights.Dropout == 0 || !training;
    }

    /// <summary>
    /// Per-row LoRA with one gathered batched matmul pair for the whole batch, however many adapters it mixes (BGMV,
    /// as in Punica): every adapter's A and B are stacked once (zero-padded to the largest rank, plus an all-zero slot
    /// for base rows), each row gathers its slot, and two bmm calls compute all rows' contributions in their dtype.
    /// Adapters of another variant (DoRA) are not stacked: their rows are gathered and go through the variant's own
    /// forward in fp32, as PEFT's mixed-batch forward does with a sub-batch per adapter.
    /// </summary>
    Tensor PerRow(Tensor x, Tensor result, string?[] rows)
    {
        if (rows.Length != x.shape[0]) throw new InvalidOperationException($"{rows.Length} row adapters for a batch of {x.shape[0]}");
        if (rows.All(r => r is null || !_adapters.ContainsKey(r))) return result;
        using var scope = NewDisposeScope();
        if (rows.Any(r => r != null && _adapters.TryGetValue(r, out var w) && w.Variant.IsPlainTerm)) result = PerRowStacked(x, result, rows);
        foreach (var name in rows.Distinct().Where(r => r != null && _adapters.TryGetValue(r, out var w) && !w.Variant.IsPlainTerm))
        {
            var w = _adapters[name!];
            var idx = tensor(Enumerable.Range(0, rows.Length).Where(i => rows[i] == name).Select(i => (long)i).ToArray(), device: x.device);
            var sub = w.Variant.Forward(base_layer, w, x.index_select(0, idx).to(w.A.dtype), result.index_select(0, idx), null);
            result = result.index_copy(0, idx, sub.to(result.dtype));
        }
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Per-token LoRA for a packed row x [1, N, in] (the serving engine's steps: decode tokens of many sequences, then
    /// prefill chunks): the leading single tokens, each of another sequence, go through the gathered path (BGMV); each
    /// later run of tokens with one adapter is one pair of plain matmuls on its slice (SGMV's segments), so a long prompt
    /// never gathers an adapter copy per token.
    /// </summary>
    Tensor PerToken(Tensor x, Tensor result, string?[] tokens)
    {
        if (x.dim() != 3 || x.shape[0] != 1 || tokens.Length != x.shape[1])
            throw new InvalidOperationException($"{tokens.Length} token adapters for an input of shape [{string.Join(", ", x.shape)}]");
        if (tokens.All(r => r is null || !_adapters.ContainsKey(r))) return result;
        using var scope = NewDisposeScope();
        var x2 = x[0];
        var r2 = result[0];
        var runs = Runs(tokens);
        int singles = 0;
        while (singles < runs.Count && runs[singles].Length == 1) singles++;
        var parts = new List<Tensor>();
        if (singles > 1)
        {
            parts.Add(PerRow(x2.narrow(0, 0, singles), r2.narrow(0, 0, singles), tokens[..singles]));
            runs = runs.Skip(singles).ToList();
        }
        foreach (var (start, length) in runs)
            parts.Add(Segment(x2.narrow(0, start, length), r2.narrow(0, start, length), tokens[start]));
        return cat(parts, 0).unsqueeze(0).MoveToOuterDisposeScope();
    }

    /// <summary>Maximal runs of equal adapters: (start, length).</summary>
    static List<(int Start, int Length)> Runs(string?[] tokens)
    {
        var runs = new List<(int, int)>();
        for (int i = 0; i < tokens.Length;)
        {
            int j = i + 1;
            while (j < tokens.Length && tokens[j] == tokens[i]) j++;
            runs.Add((i, j - i));
            i = j;
        }
        return runs;
    }

    /// <summary>One adapter's term on a run of tokens [T, in] added to their base output [T, out].</summary>
    Tensor Segment(Tensor x, Tensor result, string? name)
    {
        if (name is null || !_adapters.TryGetValue(name, out var w)) return result;
        if (w.Variant.IsPlainTerm) return w.AddTerm(result, x);
        return w.Variant.Forward(base_layer, w, x.to(w.A.dtype), result, null).to(result.dtype);
    }

    /// <summary>
    /// Every token through the stacked adapters by its slot (<see cref="RowSlots"/>, one per token of x's leading
    /// dimensions), with no look at adapter names: the same kernels whatever the batch mixes, as a CUDA graph needs.
    /// Plain-term adapters only (the engine sends batches with others through <see cref="RowAdapters"/>).
    /// </summary>
    Tensor Gathered(Tensor x, Tensor result, Tensor slots)
    {
        if (_adapters.Count == 0) return result;
        using var scope = NewDisposeScope();
        var stack = SyncStack(x.dtype, x.device);
        if (Runtime.Cuda.LoraGatherKernels.Usable(x.device) && x.dtype == result.dtype)
        {
            // Each row reads its adapter where it is stacked (BGMV): no [N, r, in] gathered copy is written and read back.
            var y = result.reshape(-1, result.shape[^1]).contiguous();
            Runtime.Cuda.LoraGatherKernels.AddInPlace(x.reshape(-1, x.shape[^1]).contiguous(), stack.A, stack.B, slots, y);
            return y.view(result.shape).MoveToOuterDisposeScope();
        }
        var x2 = x.reshape(-1, 1, x.shape[^1]);                   // [N, 1, in]
        var lora = x2.bmm(stack.A.index_select(0, slots).transpose(1, 2)).bmm(stack.B.index_select(0, slots).transpose(1, 2));
        return result.Plus(lora.view(result.shape).to(result.dtype)).MoveToOuterDisposeScope();
    }

    /// <summary>The stacked (BGMV) strategy for the rows whose adapters are plain terms.</summary>
    Tensor PerRowStacked(Tensor x, Tensor result, string?[] rows)
    {
        var stack = SyncStack(x.dtype, x.device);
        var slots = tensor(rows.Select(r => (long)SlotFor(r)).ToArray(), device: x.device);
        var ar = stack.A.index_select(0, slots);                  // [B, r, in]
        var br = stack.B.index_select(0, slots);                  // [B, out, r], scaling folded in
        var h = x.dim() == 2 ? x.unsqueeze(1) : x;                // [B, T, in]
        var lora = h.bmm(ar.transpose(1, 2)).bmm(br.transpose(1, 2));
        if (x.dim() == 2) lora = lora.squeeze(1);
        return result.Plus(lora.to(result.dtype));
    }

    readonly AdapterStack _stack = new();

    /// <summary>
    /// The model-wide serving slot of each adapter (set by <see cref="LoraModel"/> when it wraps the layer); without one,
    /// adapters are numbered by this layer alone.
    /// </summary>
    internal Func<string, int>? SlotOf { get; set; }

    /// <summary>
    /// Serving: each row's (or packed token's) adapter slot as a device tensor [B] int64, computed once per step for all
    /// layers (and fixed in place for a CUDA graph); null: derived from <see cref="RowAdapters"/> in each layer.
    /// </summary>
    public Tensor? RowSlots { get; set; }

    int SlotFor(string? name) => name is null || !_adapters.TryGetValue(name, out var w) || !w.Variant.IsPlainTerm ? 0 : Slot(name);

    int Slot(string name) => SlotOf?.Invoke(name) ?? (_adapters.Keys.Order(StringComparer.Ordinal).ToList().IndexOf(name) + 1);

    /// <summary>Brings the stacked adapters in line with this layer's (see <see cref="AdapterStack"/>); true when they moved.</summary>
    internal AdapterStack SyncStack(ScalarType dtype, Device device, bool[]? moved = null)
    {
        bool realloc = _stack.Sync(_adapters, Slot, base_layer.InFeatures, base_layer.OutFeatures, dtype, device);
        if (moved is not null && realloc) moved[0] = true;
        return _stack;
    }


    /// <summary>scaling · B · A in fp32 ([out, in]), the one definition every merge path uses (PEFT's get_delta_weight).</summary>
    public Tensor DeltaWeight(string name) => _adapters[name].Delta();

    /// <summary>
    /// Puts the adapter into the base weight through its variant. Safe merge: computed on an fp32 clone of the weight and
    /// committed only if every value is finite; otherwise nothing changes and the call throws.
    /// </summary>
    public void Merge(string name)
    {
        if (_merged.Contains(name)) return;
        NotQuantized(name);
        var w = _adapters[name];
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var weight = base_layer.weight;
        var merged = w.Variant.Merged(w, weight.to(ScalarType.Float32), w.Delta(), out var cache);
        if (!merged.isfinite().all().item<bool>())
            throw new InvalidOperationException($"merging adapter '{name}' would put non-finite values into the weights; nothing was changed");
        weight.copy_(merged.to(weight.dtype));
        w.MergeCache?.Dispose();
        w.MergeCache = cache?.DetachFromDisposeScope();
        _merged.Push(name);
    }

    /// <summary>Takes the most recently merged adapter out of the base weight; false when none is merged.</summary>
    public bool UnmergeLast()
    {
        if (!_merged.TryPop(out var name)) return false;
        var w = _adapters[name];
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var weight = base_layer.weight;
        weight.copy_(w.Variant.Unmerged(w, weight.to(ScalarType.Float32), w.Delta(), w.MergeCache).to(weight.dtype));
        w.MergeCache?.Dispose();
        w.MergeCache = null;
        return true;
    }

    /// <summary>
    /// In-place merging needs a dense weight: packed codes cannot hold W + ΔW. Merging an adapter trained on a quantized
    /// base writes a new checkpoint of the dequantized base + delta instead (<see cref="DeltaWeight"/> and
    /// <see cref="Models.Linear.EffectiveWeight"/>).
    /// </summary>
    void NotQuantized(string name)
    {
        if (base_layer.IsQuantized)
            throw new LoraKitException($"cannot merge adapter '{name}' in place: the base layer is {base_layer.Packed!.Method}-quantized (packed); write a merged checkpoint of the dequantized base + delta instead");
    }

    /// <summary>Undoes the merges, last merged first, until none remain (base weights restored within rounding).</summary>
    public void UnmergeAll()
    {
        while (UnmergeLast()) { }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            foreach (var w in _adapters.Values) w.Dispose();
            _adapters.Clear();
            _stack.Dispose();
        }
        base.Dispose(disposing);
    }
}
