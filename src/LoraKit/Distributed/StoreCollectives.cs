using static TorchSharp.torch;

namespace LoraKit.Distributed;

/// <summary>
/// A CPU process group whose all-reduce goes through the TCP store: each rank publishes its tensor (read once by every
/// other rank, then dropped) and sums all ranks' in rank order, so every rank gets bit-identical sums. Slow — a few
/// round trips per call, values bounded by the store's frame — and meant for what it is used for: running the whole
/// multi-process path (launcher, sharding, normalisation, rank-0 writes, failure handling) on CPU in tests, and
/// debugging without GPUs. GPU runs use <see cref="NcclCollectives"/>.
/// </summary>
public sealed class StoreCollectives(TcpStore store, int rank, int worldSize, TimeSpan timeout) : ICollectives
{
    long _calls;

    /// <inheritdoc/>
    public int Rank => rank;
    /// <inheritdoc/>
    public int WorldSize => worldSize;

    /// <inheritdoc/>
    public void AllReduceSum(Tensor t)
    {
        if (t.device.type != TorchSharp.DeviceType.CPU) throw new ArgumentException("the store's all-reduce sums CPU tensors (GPU runs use NCCL)");
        long call = ++_calls;
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var mine = t.to(ScalarType.Float64).contiguous().data<double>().ToArray();
        var bytes = new byte[mine.Length * sizeof(double)];
        Buffer.BlockCopy(mine, 0, bytes, 0, bytes.Length);
        store.Set($"allreduce/{call}/{rank}", bytes, readers: worldSize - 1);
        var sum = new double[mine.Length];
        for (int r = 0; r < worldSize; r++)
        {
            var part = r == rank ? mine : FromBytes(store.Get($"allreduce/{call}/{r}", timeout), mine.Length, r);
            for (int i = 0; i < sum.Length; i++) sum[i] += part[i];
        }
        t.copy_(tensor(sum).view(t.shape));
    }

    static double[] FromBytes(byte[] bytes, int count, int rank)
    {
        if (bytes.Length != count * sizeof(double)) throw new InvalidOperationException($"rank {rank} contributed {bytes.Length / sizeof(double)} values to an all-reduce of {count}: the ranks' collectives are out of step");
        var values = new double[count];
        Buffer.BlockCopy(bytes, 0, values, 0, bytes.Length);
        return values;
    }

    /// <inheritdoc/>
    /// <remarks>The store's own deadlines bound every wait here, so no separate watchdog is needed.</remarks>
    public IDisposable Watch(string what) => NoScope.Instance;

    sealed class NoScope : IDisposable
    {
        public static readonly NoScope Instance = new();
        public void Dispose() { }
    }
}
