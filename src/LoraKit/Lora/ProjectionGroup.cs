using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// Frozen linear layers that read the same input (q/k/v, gate/up) run as one GEMM in the training fast path, their
/// adapters as one more: y = x·[W₁;W₂;…]ᵀ + (x·[A₁;A₂;…]ᵀ)·Bᵀ with B block-diagonal (each block sᵢ·Bᵢ). Backward is then
/// one GEMM for the input's gradient instead of one per layer plus their sum, and k/v (N = 512 for Llama-3 GQA) stop
/// running as separate, poorly shaped GEMMs. The base weights are concatenated once and each layer's weight is re-pointed
/// at its rows of the shared buffer, so the layers, merging and saving see the same tensors as before.
/// </summary>
public sealed class ProjectionGroup
{
    readonly Models.Linear[] _bases;
    readonly Tensor _weight;
    readonly Tensor? _bias;
    readonly long[] _widths;

    ProjectionGroup(Models.Linear[] bases)
    {
        _bases = bases;
        _widths = bases.Select(b => b.OutFeatures).ToArray();
        using var _ = no_grad();
        _weight = Concatenate(bases.Select(b => (Tensor)b.weight).ToArray());
        _bias = bases[0].bias is null ? null : Concatenate(bases.Select(b => (Tensor)b.bias!).ToArray());
    }

    /// <summary>One buffer holding the parts one after another; each part is re-pointed at its slice.</summary>
    static Tensor Concatenate(Tensor[] parts)
    {
        var all = cat(parts, 0).DetachFromDisposeScope();
        long offset = 0;
        foreach (var p in parts)
        {
            long n = p.shape[0];
            using var slice = all.narrow(0, offset, n);
            p.set_(slice);
            offset += n;
        }
        return all;
    }

    /// <summary>Output widths of the layers, in order.</summary>
    public IReadOnlyList<long> Widths => _widths;

    /// <summary>
    /// The group of <paramref name="modules"/> (plain or LoRA-wrapped linear layers) when they can run fused: frozen,
    /// the same input width and dtype, biases on all or none, at most one live adapter each and no dropout. The shared
    /// weight buffer is made on first use and kept in <paramref name="cache"/>.
    /// </summary>
    public static ProjectionGroup? For(ref ProjectionGroup? cache, params nn.Module<Tensor, Tensor>[] modules)
    {
        var bases = new Models.Linear[modules.Length];
        for (int i = 0; i < modules.Length; i++)
        {
            switch (modules[i])
            {
                case Models.Linear l: bases[i] = l; break;
                case LoraLinear ll when ll.TrySingleAdapter(out _): bases[i] = ll.base_layer; break;
                default: return null;
            }
            var b = bases[i];
            if (b.weight.requires_grad || b.bias is { requires_grad: true }) return null;
            if (b.InFeatures != bases[0].InFeatures || b.weight.dtype != bases[0].weight.dtype || (b.bias is null) != (bases[0].bias is null)) return null;
        }
        if (cache is null || !cache._bases.SequenceEqual(bases)) cache = new ProjectionGroup(bases);
        return cache;
    }

    /// <summary>All the layers' outputs side by side, [..., Σ out] (adapters as they are now, in the input's dtype).</summary>
    public Tensor Forward(Tensor x, nn.Module<Tensor, Tensor>[] modules)
    {
        using var scope = NewDisposeScope();
        var x2 = x.reshape(-1, x.shape[^1]);
        var y = nn.functional.linear(x2, _weight, _bias);
        var adapters = modules.Select(m => m is LoraLinear ll && ll.TrySingleAdapter(out var w) ? w : null).ToArray();
        if (adapters.Any(w => w != null))
        {
            var dt = x.dtype;
            long rank = adapters.Sum(w => w?.Rank ?? 0);
            var a = cat(adapters.OfType<LoraWeights>().Select(w => w.A.to(dt)).ToArray(), 0);      // [Σr, in]
            var h = nn.functional.linear(x2, a);                                                    // [N, Σr]
            var rows = new List<Tensor>();
            long before = 0;
            for (int i = 0; i < adapters.Length; i++)
            {
                if (adapters[i] is not { } w) { rows.Add(zeros([_widths[i], rank], dt, x.device)); continue; }
                var parts = new List<Tensor>();
                if (before > 0) parts.Add(zeros([_widths[i], before], dt, x.device));
                parts.Add((w.B * w.Scaling).to(dt));
                long after = rank - before - w.Rank;
                if (after > 0) parts.Add(zeros([_widths[i], after], dt, x.device));
                rows.Add(parts.Count == 1 ? parts[0] : cat(parts.ToArray(), 1));
                before += w.Rank;
            }
            var blockB = cat(rows.ToArray(), 0);                                                    // [Σout, Σr]
            y = y.addmm_(h, blockB.t());
        }
        var shape = x.shape.ToArray();
        shape[^1] = _widths.Sum();
        return y.view(shape).MoveToOuterDisposeScope();
    }
}
