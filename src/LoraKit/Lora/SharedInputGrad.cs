using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// The input gradient of <see cref="LoraProjection"/>s that read the same input (q/k/v, gate/up), summed by their
/// backwards in one buffer: each base GEMM accumulates onto it (beta = 1, read in the GEMM's epilogue), and the
/// adapters' parts are added at the end by one GEMM over the concatenated dh [tokens, Σr] and A [Σr, in]. The last
/// backward to run returns the sum as the input's grad and the others return none, so autograd adds nothing; on its
/// own it would write each projection's dx and then add them up (two memory-bound passes over [tokens, in] each).
/// Members whose dA was deferred here (their h came from one grouped GEMM, and their A has a grad to add into) get it
/// from one GEMM dhᵀ·x over the concatenated dh, so x is read once for the group rather than once per adapter.
/// </summary>
public sealed class SharedInputGrad(int consumers)
{
    Tensor? _sum;
    readonly List<(Tensor dh, Tensor a, Parameter? deferredA)> _lora = [];
    Tensor? _x;
    int _seen;

    /// <summary>
    /// Adds dy·W (+ dh·A later); returns the whole [tokens, in] sum after the last consumer, else null.
    /// <paramref name="deferA"/>: the input x2 [tokens, in] and the A whose grad gets dhᵀ·x2 added at the end.
    /// </summary>
    public Tensor? Add(Tensor dy2, Tensor weight, Tensor? dh, Tensor? a, (Tensor x2, Parameter a)? deferA = null)
    {
        if (_sum is null) _sum = dy2.mm(weight).DetachFromDisposeScope();
        else _sum.addmm_(dy2, weight);
        if (dh is not null) _lora.Add((dh.alias().DetachFromDisposeScope(), a!.alias().DetachFromDisposeScope(), deferA?.a));
        if (deferA is { } d && _x is null) _x = d.x2.alias().DetachFromDisposeScope();
        if (++_seen < consumers) return null;
        bool allDeferred = _lora.Count > 1 && _lora.All(p => p.deferredA is not null);
        if (_lora.Count == 1) _sum.addmm_(_lora[0].dh, _lora[0].a);
        else if (_lora.Count > 1)
        {
            using var dhs = cat(_lora.Select(p => p.dh).ToArray(), 1);
            using var As = cat(_lora.Select(p => p.a).ToArray(), 0);
            _sum.addmm_(dhs, As);
            if (allDeferred) AddGradA(dhs);
        }
        if (!allDeferred)
            foreach (var (member, _, deferred) in _lora)
                if (deferred is not null) AddGradA(member, deferred);
        foreach (var (h, w, _) in _lora) { h.Dispose(); w.Dispose(); }
        _lora.Clear();
        _x?.Dispose();
        _x = null;
        var sum = _sum;
        _sum = null;
        _seen = 0;
        return sum;
    }

    /// <summary>The members' dA = dhᵀ·x from one GEMM over their concatenated dh, split by rank.</summary>
    void AddGradA(Tensor dhs)
    {
        using var all = dhs.t().mm(_x!);                                     // [Σr, in]
        long offset = 0;
        foreach (var (dh, _, a) in _lora)
        {
            using var grad = a!.grad!;
            using var rows = all.narrow(0, offset, dh.shape[1]);
            grad.PlusInPlace(rows);
            offset += dh.shape[1];
        }
    }

    void AddGradA(Tensor dh, Parameter a)
    {
        using var grad = a.grad!;
        using var g = dh.t().mm(_x!);
        grad.PlusInPlace(g);
    }
}
