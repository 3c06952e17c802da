using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>One adapter's weights on one layer: A [r, in], B [out, r] (fp32, trainable), its scaling and dropout.</summary>
public sealed class LoraWeights(Parameter a, Parameter b, double scaling, double dropout)
{
    public Parameter A { get; } = a;
    public Parameter B { get; } = b;
    public double Scaling { get; } = scaling;
    public double Dropout { get; } = dropout;
    public int Rank => (int)A.shape[0];
}

/// <summary>
/// A frozen base linear layer plus any number of named LoRA adapters (PEFT's lora.Linear):
/// y = base(x) + Σ_active scaling · B(A(dropout(x))). Adapters are kept in fp32 and computed on an fp32 copy of x,
/// the sum cast back to the base output's dtype. Merging adds scaling·B·A into the base weight (computed in fp32,
/// committed only if finite); unmerging subtracts it again, last merged first.
/// </summary>
public sealed class LoraLinear : nn.Module<Tensor, Tensor>
{
#pragma warning disable IDE1006 // PEFT's module name, so paths read model.layers.0.self_attn.q_proj.base_layer
    public Models.Linear base_layer;
#pragma warning restore IDE1006
    readonly Dictionary<string, LoraWeights> _adapters = new(StringComparer.Ordinal);
    readonly Stack<string> _merged = new();

    public LoraLinear(Models.Linear baseLayer) : base("LoraLinear")
    {
        base_layer = baseLayer;
        RegisterComponents();
    }

    public IReadOnlyDictionary<string, LoraWeights> Adapters => _adapters;
    /// <summary>Adapters applied in forward (ignored while <see cref="Disabled"/>).</summary>
    public List<string> Active { get; } = [];
    public bool Disabled { get; set; }
    /// <summary>
    /// Serving: the adapter of each batch row (null = base model). When set, it replaces <see cref="Active"/>: each
    /// adapter's rows are gathered, sent through its A and B, and added back (a segmented LoRA, as in Punica/S-LoRA).
    /// </summary>
    public string?[]? RowAdapters { get; set; }
    public IReadOnlyCollection<string> Merged => _merged;
    /// <summary>
    /// Training fast path: compute the adapters in the input's dtype (bf16 on GPUs) instead of on an fp32 copy of x.
    /// Autograd then keeps x itself (shared by q/k/v and by gate/up) rather than one fp32 copy per module, and the
    /// branch is two small matmuls, the second adding into the base output (addmm). The fp32 weights stay the master copy
    /// (their casts are tiny and differentiable). Off by default: PEFT's fp32 branch is the reference numerics.
    /// </summary>
    public bool ComputeInInputDtype { get; set; }

    public void AddAdapter(string name, LoraWeights w)
    {
        if (w.A.shape[1] != base_layer.InFeatures || w.B.shape[0] != base_layer.OutFeatures || w.B.shape[1] != w.A.shape[0])
            throw new ArgumentException($"adapter '{name}' shapes A{Shape(w.A)} B{Shape(w.B)} do not fit a layer {base_layer.InFeatures}→{base_layer.OutFeatures}");
        if (_merged.Contains(name)) throw new InvalidOperationException($"adapter '{name}' is merged; unmerge before replacing it");
        if (_adapters.Remove(name, out var old)) { old.A.Dispose(); old.B.Dispose(); }
        _adapters[name] = w;
        InvalidateStack();
    }

    public void RemoveAdapter(string name)
    {
        if (_merged.Contains(name)) throw new InvalidOperationException($"adapter '{name}' is merged; unmerge before removing it");
        if (_adapters.Remove(name, out var w)) { w.A.Dispose(); w.B.Dispose(); }
        Active.Remove(name);
        InvalidateStack();
    }

    static string Shape(Tensor t) => "[" + string.Join(", ", t.shape) + "]";

    /// <summary>Where dropout masks come from while training (a run's own seeded stream); null: torch's global generator.</summary>
    public Runtime.RngStream? Rng { get; set; }

    public override Tensor forward(Tensor x)
    {
        if (ComputeInInputDtype && TrySingleAdapter(out var single) && single != null)
            return training && is_grad_enabled() ? LoraProjection.Apply(x, base_layer, single) : SingleInInputDtype(x, single);
        var result = base_layer.forward(x);
        if (RowAdapters is { } rows && !Disabled) return PerRow(x, result, rows);
        if (Disabled || Active.Count == 0) return result;
        if (ComputeInInputDtype) return InInputDtype(x, result);
        using var scope = NewDisposeScope();
        var dtype = result.dtype;
        var acc = result;
        foreach (var name in Active)
        {
            if (_merged.Contains(name)) continue; // already inside the base weight
            var w = _adapters[name];
            var h = x.to(w.A.dtype);
            if (w.Dropout > 0 && training) h = Rng is { } rng ? rng.Dropout(h, w.Dropout) : nn.functional.dropout(h, w.Dropout, training: true);
            var lora = nn.functional.linear(nn.functional.linear(h, w.A), w.B) * w.Scaling;
            acc = acc + lora;
        }
        var y = acc.to(dtype);
        return y.MoveToOuterDisposeScope();
    }

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
        return LoraProjection.Compute(x2, down, (w.B * w.Scaling).to(x.dtype), base_layer).view(shape).MoveToOuterDisposeScope();
    }

    Tensor InInputDtype(Tensor x, Tensor result)
    {
        using var scope = NewDisposeScope();
        var x2 = x.reshape(-1, x.shape[^1]);
        var acc = result.reshape(-1, result.shape[^1]);
        foreach (var name in Active)
        {
            if (_merged.Contains(name)) continue;
            var w = _adapters[name];
            var h = w.Dropout > 0 && training ? (Rng is { } rng ? rng.Dropout(x2, w.Dropout) : nn.functional.dropout(x2, w.Dropout, training: true)) : x2;
            var down = nn.functional.linear(h, w.A.to(x.dtype));                       // [N, r]
            acc = acc.addmm(down, w.B.to(x.dtype).t(), beta: 1, alpha: (float)w.Scaling); // base + s·(x·Aᵀ)·Bᵀ
        }
        return acc.view(result.shape).MoveToOuterDisposeScope();
    }

    /// <summary>The one adapter a fused training kernel may fold in: exactly one active, unmerged, without dropout.</summary>
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
        return weights is null || weights.Dropout == 0 || !training;
    }

    /// <summary>
    /// Per-row LoRA with one gathered batched matmul pair for the whole batch, however many adapters it mixes (BGMV,
    /// as in Punica): every adapter's A and B are stacked once (zero-padded to the largest rank, plus an all-zero slot
    /// for base rows), each row gathers its slot, and two bmm calls compute all rows' contributions in their dtype.
    /// </summary>
    Tensor PerRow(Tensor x, Tensor result, string?[] rows)
    {
        if (rows.Length != x.shape[0]) throw new InvalidOperationException($"{rows.Length} row adapters for a batch of {x.shape[0]}");
        if (rows.All(r => r is null || !_adapters.ContainsKey(r))) return result;
        using var scope = NewDisposeScope();
        var (a, b, scale, slotOf) = Stacked(x.dtype, x.device);
        var slots = tensor(rows.Select(r => r != null && slotOf.TryGetValue(r, out int i) ? (long)i : 0L).ToArray(), device: x.device);
        var ar = a.index_select(0, slots);                        // [B, r, in]
        var br = b.index_select(0, slots);                        // [B, out, r]
        var sr = scale.index_select(0, slots).view(-1, 1, 1);     // [B, 1, 1]
        var h = x.dim() == 2 ? x.unsqueeze(1) : x;                // [B, T, in]
        var lora = h.bmm(ar.transpose(1, 2)).bmm(br.transpose(1, 2)) * sr;
        if (x.dim() == 2) lora = lora.squeeze(1);
        return (result + lora.to(result.dtype)).MoveToOuterDisposeScope();
    }

    (Tensor a, Tensor b, Tensor scale, Dictionary<string, int> slotOf)? _stack;
    ScalarType _stackType;

    /// <summary>
    /// The stacked adapters in <paramref name="dtype"/>, slot 0 the zero adapter. A snapshot for serving: rebuilt when
    /// adapters are added or removed, not when their weights are trained in place (training never uses row adapters).
    /// </summary>
    (Tensor a, Tensor b, Tensor scale, Dictionary<string, int> slotOf) Stacked(ScalarType dtype, Device device)
    {
        if (_stack is { } st && _stackType == dtype && st.slotOf.Count == _adapters.Count && _adapters.Keys.All(st.slotOf.ContainsKey)) return st;
        InvalidateStack();
        using var scope = NewDisposeScope();
        int r = _adapters.Values.Max(w => w.Rank);
        long inF = base_layer.InFeatures, outF = base_layer.OutFeatures;
        var names = _adapters.Keys.ToList();
        var a = zeros([names.Count + 1, r, inF], dtype, device);
        var b = zeros([names.Count + 1, outF, r], dtype, device);
        var scales = new float[names.Count + 1];
        using (var _ = no_grad())
            for (int i = 0; i < names.Count; i++)
            {
                var w = _adapters[names[i]];
                a[i + 1, ..w.Rank] = w.A.to(dtype);
                b[i + 1, .., ..w.Rank] = w.B.to(dtype);
                scales[i + 1] = (float)w.Scaling;
            }
        var scale = tensor(scales, device: device).to(dtype);
        var slotOf = names.Select((n, i) => (n, i + 1)).ToDictionary(p => p.n, p => p.Item2);
        _stack = (a.DetachFromDisposeScope(), b.DetachFromDisposeScope(), scale.DetachFromDisposeScope(), slotOf);
        _stackType = dtype;
        return _stack.Value;
    }

    void InvalidateStack()
    {
        if (_stack is { } st) { st.a.Dispose(); st.b.Dispose(); st.scale.Dispose(); }
        _stack = null;
    }

    /// <summary>scaling · B · A in fp32 ([out, in]), the one definition every merge path uses.</summary>
    public Tensor DeltaWeight(string name)
    {
        var w = _adapters[name];
        using var _ = no_grad();
        return w.B.to(ScalarType.Float32).matmul(w.A.to(ScalarType.Float32)) * w.Scaling;
    }

    /// <summary>Adds the adapter into the base weight. Safe merge: computed on an fp32 clone and committed only if finite.</summary>
    public void Merge(string name)
    {
        if (_merged.Contains(name)) return;
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var weight = base_layer.weight;
        var merged = weight.to(ScalarType.Float32) + DeltaWeight(name);
        if (!merged.isfinite().all().item<bool>())
            throw new InvalidOperationException($"merging adapter '{name}' would put non-finite values into the weights; nothing was changed");
        weight.copy_(merged.to(weight.dtype));
        _merged.Push(name);
    }

    /// <summary>Undoes the most recent merges until none remain (base weights restored within rounding).</summary>
    public void UnmergeAll()
    {
        using var _ = no_grad();
        while (_merged.TryPop(out var name))
        {
            using var scope = NewDisposeScope();
            var weight = base_layer.weight;
            weight.copy_((weight.to(ScalarType.Float32) - DeltaWeight(name)).to(weight.dtype));
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            foreach (var w in _adapters.Values) { w.A.Dispose(); w.B.Dispose(); }
            InvalidateStack();
        }
        base.Dispose(disposing);
    }
}
