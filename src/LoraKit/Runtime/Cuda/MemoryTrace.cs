using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// Where in a training step the allocator's peak falls (a diagnostic for <c>lorakit bench --memory-trace</c>): each
/// <see cref="Mark"/> records the bytes allocated now and the peak since the previous mark, then restarts the peak.
/// Off unless <see cref="Enabled"/>; reading the counters costs no synchronisation (they are the host's bookkeeping).
/// </summary>
internal static class MemoryTrace
{
    public readonly record struct Entry(string Label, double AllocatedGib, double PeakGib);

    static readonly List<Entry> Entries = [];

    public static bool Enabled { get; set; }

    /// <summary>A per-layer mark; the label (<paramref name="format"/> with the layer as {0}) is made only while tracing.</summary>
    public static void Mark(string format, int layer, Device device)
    {
        if (Enabled) Mark(string.Format(format, layer), device);
    }

    public static void Mark(string label, Device device)
    {
        if (!Enabled || CudaMemoryStats.Read(device) is not { } m) return;
        Entries.Add(new Entry(label, Math.Round(CudaMemory.Gib(m.Allocated), 3), Math.Round(CudaMemory.Gib(m.PeakAllocated), 3)));
        CudaMemoryStats.ResetPeak(device);
    }

    /// <summary>The marks so far, oldest first; clears them.</summary>
    public static List<Entry> Take()
    {
        var all = Entries.ToList();
        Entries.Clear();
        return all;
    }
}
