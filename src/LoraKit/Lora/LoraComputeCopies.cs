using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// Training fast path: the activation-dtype copies of every single-adapter projection's A and s·B (bf16 on GPUs),
/// made at the start of each training forward by a few kernels over all of them (one concatenation, one scale per
/// distinct scaling, one cast) instead of three tiny kernels per projection and pass (forward, checkpoint replay).
/// The values are exactly those casts' (s·B is scaled in fp32, then rounded). Copies exist only from one training
/// forward to the next: any other forward (evaluation, generation) clears them, so nothing reads a stale copy.
/// </summary>
public sealed class LoraComputeCopies(Func<IEnumerable<LoraLinear>> layers)
{
    readonly List<LoraWeights> _current = [];

    /// <summary>Whether training forwards make copies (tests compare against the per-projection casts).</summary>
    public bool Enabled { get; set; } = true;

    /// <summary>Called by <see cref="Models.DecoderModel"/> before each forward: refresh for a training forward with gradients, else clear.</summary>
    public void BeforeForward(ScalarType dtype, bool trainingWithGrad)
    {
        Clear();
        if (!Enabled || !trainingWithGrad) return;
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        foreach (var layer in layers())
            if (layer.ComputeInInputDtype && layer.TrySingleAdapter(out var w) && w != null && w.A.dtype != dtype && w.B.dtype == w.A.dtype)
                _current.Add(w);
        if (_current.Count == 0) return;
        // [A₀ … Aₙ | B's grouped by scaling], scaled in fp32 per group, then one cast.
        var order = _current.OrderBy(w => w.Scaling).ToList();
        var flat = cat(_current.Select(w => w.A.flatten()).Concat(order.Select(w => w.B.flatten())).ToArray());
        long offset = _current.Sum(w => w.A.numel());
        foreach (var group in order.GroupBy(w => w.Scaling))
        {
            long n = group.Sum(w => w.B.numel());
            if (group.Key != 1) flat.narrow(0, offset, n).mul_(group.Key);
            offset += n;
        }
        var low = flat.to(dtype);
        offset = 0;
        foreach (var w in _current) { w.ComputeA = View(low, ref offset, w.A.shape); }
        foreach (var w in order) { w.ComputeSB = View(low, ref offset, w.B.shape); }
    }

    static Tensor View(Tensor flat, ref long offset, long[] shape)
    {
        long n = shape.Aggregate(1L, (a, b) => a * b);
        var v = flat.narrow(0, offset, n).view(shape).DetachFromDisposeScope();
        offset += n;
        return v;
    }

    public void Clear()
    {
        foreach (var w in _current)
        {
            w.ComputeA?.Dispose();
            w.ComputeSB?.Dispose();
            (w.ComputeA, w.ComputeSB) = (null, null);
        }
        _current.Clear();
    }
}
