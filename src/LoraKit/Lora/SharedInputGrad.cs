using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// The input gradient of <see cref="LoraProjection"/>s that read the same input (q/k/v, gate/up), summed by their
/// backwards in one buffer: each base GEMM accumulates onto it (beta = 1, read in the GEMM's epilogue), and the
/// adapters' parts are added at the end by one GEMM over the concatenated dh [tokens, Σr] and A [Σr, in]. The last
/// backward to run returns the sum as the input's grad and the others return none, so autograd adds nothing; on its
/// own it would write each projection's dx and then add them up (two memory-bound passes over [tokens, in] each).
/// </summary>
public sealed class SharedInputGrad(int consumers)
{
    Tensor? _sum;
    readonly List<(Tensor dh, Tensor a)> _lora = [];
    int _seen;

    /// <summary>Adds dy·W (+ dh·A later); returns the whole [tokens, in] sum after the last consumer, else null.</summary>
    public Tensor? Add(Tensor dy2, Tensor weight, Tensor? dh, Tensor? a)
    {
        if (_sum is null) _sum = dy2.mm(weight).DetachFromDisposeScope();
        else _sum.addmm_(dy2, weight);
        if (dh is not null) _lora.Add((dh.alias().DetachFromDisposeScope(), a!.alias().DetachFromDisposeScope()));
        if (++_seen < consumers) return null;
        if (_lora.Count == 1) _sum.addmm_(_lora[0].dh, _lora[0].a);
        else if (_lora.Count > 1)
        {
            using var dhs = cat(_lora.Select(p => p.dh).ToArray(), 1);
            using var As = cat(_lora.Select(p => p.a).ToArray(), 0);
            _sum.addmm_(dhs, As);
        }
        foreach (var (h, w) in _lora) { h.Dispose(); w.Dispose(); }
        _lora.Clear();
        var sum = _sum;
        _sum = null;
        _seen = 0;
        return sum;
    }
}
