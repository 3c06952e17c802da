using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Runtime;

/// <summary>
/// A private random stream (a torch.Generator of its own) for what a training run draws: dropout masks. Torch's global
/// generator is shared by everything in the process (another run, a test or request running beside this one), so a run
/// that drew from it would not be reproducible from its seed; one seeded stream per run is, and its state is what a
/// checkpoint saves and what activation checkpointing replays.
/// </summary>
public sealed class RngStream(ulong seed, Device device) : IDisposable
{
    readonly Generator _gen = new(seed, device);

    public byte[] State()
    {
        using var s = _gen.get_state();
        return s.bytes.ToArray();
    }

    public void Restore(byte[] state)
    {
        using var t = empty(state.Length, ScalarType.Byte);
        t.bytes = state;
        _gen.set_state(t);
    }

    /// <summary>Inverted dropout (as torch's): zeroes elements with probability <paramref name="p"/> and scales the rest by 1/(1-p).</summary>
    public Tensor Dropout(Tensor x, double p)
    {
        using var scope = NewDisposeScope();
        var keep = empty_like(x).bernoulli_(1 - p, _gen);
        return (x * keep).mul_(1.0 / (1 - p)).MoveToOuterDisposeScope();
    }

    public void Dispose() => _gen.Dispose();
}
