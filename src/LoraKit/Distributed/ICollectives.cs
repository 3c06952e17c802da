using static TorchSharp.torch;

namespace LoraKit.Distributed;

/// <summary>
/// What data-parallel training needs from a process group: its size and this rank, a sum all-reduce in place, and a
/// watchdog to arm around work that waits on the other ranks. Implementations: <see cref="NcclCollectives"/> (CUDA),
/// <see cref="StoreCollectives"/> (CPU, over the TCP store: tests and debugging), and the tests' in-process group.
/// Every rank must call the collectives in the same order with tensors of the same shape and dtype.
/// </summary>
public interface ICollectives
{
    /// <summary>This process's rank, 0 … <see cref="WorldSize"/>−1.</summary>
    int Rank { get; }

    /// <summary>The number of ranks.</summary>
    int WorldSize { get; }

    /// <summary>Replaces <paramref name="t"/> (contiguous, on this rank's device) by the element-wise sum of every rank's <paramref name="t"/>.</summary>
    void AllReduceSum(Tensor t);

    /// <summary>
    /// Arms the watchdog for <paramref name="what"/> (e.g. "step 12") until the returned scope ends: if it does not end
    /// within the group's timeout (a rank died or hangs), the process reports it in one line and exits rather than hang.
    /// </summary>
    IDisposable Watch(string what);
}

/// <summary>Helpers over <see cref="ICollectives"/>.</summary>
public static class CollectivesExtensions
{
    /// <summary>The sums over all ranks of a few host numbers (one small all-reduce in fp64, exact for counts below 2^53).</summary>
    public static double[] SumAcrossRanks(this ICollectives group, Device device, params double[] values)
    {
        using var t = tensor(values, dtype: ScalarType.Float64, device: device);
        group.AllReduceSum(t);
        using var host = t.cpu();
        return host.data<double>().ToArray();
    }
}
