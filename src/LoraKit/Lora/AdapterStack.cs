using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// One layer's plain-term adapters stacked for gathered serving matmuls (BGMV, as in Punica and S-LoRA):
/// A [slots, R, in] and s·B [slots, out, R] in the serving dtype, zero-padded to the largest rank R. An adapter sits at
/// its model-wide slot (<see cref="LoraModel.SlotOf"/>), the same in every layer, so one slot index per token serves the
/// whole model; slot 0, and the slot of an adapter that does not target this layer, stay zero. Adapters joining or
/// leaving write or clear their own slot in place: the tensors keep their addresses (a captured CUDA graph stays
/// valid) until a larger slot or rank forces a reallocation, which <see cref="Version"/> counts.
/// </summary>
internal sealed class AdapterStack : IDisposable
{
    readonly Dictionary<string, (int Slot, LoraWeights Weights)> _written = new(StringComparer.Ordinal);
    Tensor? _a, _b;
    int _capacity, _rank;

    /// <summary>A [slots, R, in], or null before the first <see cref="Sync"/>.</summary>
    public Tensor A => _a!;
    public Tensor B => _b!;
    /// <summary>Reallocations so far (each one moves the tensors).</summary>
    public int Version { get; private set; }

    /// <summary>Brings the stack in line with the layer's adapters; true when the tensors were reallocated.</summary>
    public bool Sync(IReadOnlyDictionary<string, LoraWeights> adapters, Func<string, int> slotOf, long inF, long outF, ScalarType dtype, Device device)
    {
        var plain = adapters.Where(kv => kv.Value.Variant.IsPlainTerm && slotOf(kv.Key) > 0).ToList();
        int needSlots = plain.Count == 0 ? 1 : plain.Max(kv => slotOf(kv.Key)) + 1;
        int needRank = plain.Count == 0 ? 1 : plain.Max(kv => kv.Value.Rank);
        bool realloc = _a is null || _a.dtype != dtype || needSlots > _capacity || needRank > _rank;
        using var _ = no_grad();
        if (realloc)
        {
            Free();
            _capacity = Math.Max(8, (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)needSlots));
            _rank = Math.Max(_rank, needRank);
            // Outlive the caller's dispose scope (a forward's): the stack lives as long as the layer.
            _a = zeros([_capacity, _rank, inF], dtype, device).DetachFromDisposeScope();
            _b = zeros([_capacity, outF, _rank], dtype, device).DetachFromDisposeScope();
            Version++;
        }
        // Clear slots whose adapter left, was replaced or moved; then write the new ones.
        foreach (var (name, (slot, w)) in _written.ToList())
            if (!adapters.TryGetValue(name, out var now) || !ReferenceEquals(now, w) || slotOf(name) != slot)
            {
                if (!realloc) Clear(slot);
                _written.Remove(name);
            }
        foreach (var (name, w) in plain)
        {
            int slot = slotOf(name);
            if (_written.TryGetValue(name, out var had) && had.Slot == slot) continue;
            Write(slot, w, dtype);
            _written[name] = (slot, w);
        }
        return realloc;
    }

    void Write(int slot, LoraWeights w, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        Clear(slot);
        _a![slot, ..w.Rank].copy_(w.A.to(dtype));
        _b![slot, .., ..w.Rank].copy_(w.B.Times(w.Scaling).to(dtype));
    }

    void Clear(int slot)
    {
        _a![slot].zero_();
        _b![slot].zero_();
    }

    void Free()
    {
        _a?.Dispose(); _b?.Dispose();
        _a = _b = null;
        _written.Clear();
    }

    public void Dispose() => Free();
}
