using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Runtime;

/// <summary>
/// A private random stream (a torch.Generator of its own) for what a training run draws: dropout masks. Torch's global
/// generator is shared by everything in the process (another run, a test or request running beside this one), so a run
/// that drew from it would not be reproducible from its seed; one seeded stream per run is, and its state is what a
/// checkpoint saves and what activation checkpointing replays.
/// TorchSharp 0.107 creates generators on the CPU only (THSGenerator_new ignores the device), and a CPU-drawn mask
/// copied over PCIe would cost more than the layer it masks; so on CUDA the stream draws a seed per mask and the
/// device's default generator, reseeded with it, draws the mask. The masks still follow from the run's seed and this
/// stream's state alone.
/// </summary>
public sealed class RngStream(ulong seed) : IDisposable
{
    readonly Generator _gen = new(seed, torch.CPU);

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
        Tensor keep;
        if (x.device_type == DeviceType.CUDA)
        {
            using var drawn = randint(long.MaxValue, new long[] { 1 }, dtype: ScalarType.Int64, generator: _gen);
            torch.cuda.manual_seed_all(drawn.item<long>());
            keep = empty_like(x).bernoulli_(1 - p);
        }
        else keep = empty_like(x).bernoulli_(1 - p, _gen);
        return (x * keep).TimesInPlace(1.0 / (1 - p)).MoveToOuterDisposeScope();
    }

    public void Dispose() => _gen.Dispose();
}
