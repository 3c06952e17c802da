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

    public void AddAdapter(string name, LoraWeights w)
    {
        if (w.A.shape[1] != base_layer.InFeatures || w.B.shape[0] != base_layer.OutFeatures || w.B.shape[1] != w.A.shape[0])
            throw new ArgumentException($"adapter '{name}' shapes A{Shape(w.A)} B{Shape(w.B)} do not fit a layer {base_layer.InFeatures}→{base_layer.OutFeatures}");
        if (_merged.Contains(name)) throw new InvalidOperationException($"adapter '{name}' is merged; unmerge before replacing it");
        if (_adapters.Remove(name, out var old)) { old.A.Dispose(); old.B.Dispose(); }
        _adapters[name] = w;
    }

    public void RemoveAdapter(string name)
    {
        if (_merged.Contains(name)) throw new InvalidOperationException($"adapter '{name}' is merged; unmerge before removing it");
        if (_adapters.Remove(name, out var w)) { w.A.Dispose(); w.B.Dispose(); }
        Active.Remove(name);
    }

    static string Shape(Tensor t) => "[" + string.Join(", ", t.shape) + "]";

    public override Tensor forward(Tensor x)
    {
        var result = base_layer.forward(x);
        if (RowAdapters is { } rows && !Disabled) return PerRow(x, result, rows);
        if (Disabled || Active.Count == 0) return result;
        using var scope = NewDisposeScope();
        var dtype = result.dtype;
        var acc = result;
        foreach (var name in Active)
        {
            if (_merged.Contains(name)) continue; // already inside the base weight
            var w = _adapters[name];
            var h = x.to(w.A.dtype);
            if (w.Dropout > 0 && training) h = nn.functional.dropout(h, w.Dropout, training: true);
            var lora = nn.functional.linear(nn.functional.linear(h, w.A), w.B) * w.Scaling;
            acc = acc + lora;
        }
        var y = acc.to(dtype);
        return y.MoveToOuterDisposeScope();
    }

    Tensor PerRow(Tensor x, Tensor result, string?[] rows)
    {
        if (rows.Length != x.shape[0]) throw new InvalidOperationException($"{rows.Length} row adapters for a batch of {x.shape[0]}");
        using var scope = NewDisposeScope();
        var dtype = result.dtype;
        var acc = result.to(ScalarType.Float32);
        foreach (var group in rows.Select((name, i) => (name, i)).Where(r => r.name != null && _adapters.ContainsKey(r.name)).GroupBy(r => r.name!))
        {
            var w = _adapters[group.Key];
            var idx = tensor(group.Select(r => (long)r.i).ToArray(), device: x.device);
            var h = x.index_select(0, idx).to(w.A.dtype);
            var lora = nn.functional.linear(nn.functional.linear(h, w.A), w.B) * w.Scaling;
            acc = acc.index_add(0, idx, lora, 1);
        }
        return acc.to(dtype).MoveToOuterDisposeScope();
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
            foreach (var w in _adapters.Values) { w.A.Dispose(); w.B.Dispose(); }
        base.Dispose(disposing);
    }
}
