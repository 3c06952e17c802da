using LoraKit.Distributed;
using static TorchSharp.torch;

namespace LoraKit.Tests.Distributed;

/// <summary>
/// A fake process group for tests: N "ranks" are threads of this process, and an all-reduce sums their tensors in rank
/// order (as every rank of a real group must see the same sums) behind a barrier. Deterministic, CPU only.
/// </summary>
sealed class InProcessGroup(int worldSize)
{
    readonly Barrier _barrier = new(worldSize);
    readonly Tensor?[] _slots = new Tensor?[worldSize];

    /// <summary>How many all-reduces rank 0 made (every rank makes the same).</summary>
    public int Calls { get; private set; }

    public ICollectives Member(int rank) => new RankView(this, rank);

    void AllReduce(int rank, Tensor t)
    {
        _slots[rank] = t.detach().clone();
        _barrier.SignalAndWait();
        using (no_grad())
        {
            using var sum = _slots[0]!.clone();
            for (int r = 1; r < _slots.Length; r++) sum.add_(_slots[r]!);
            t.copy_(sum);
        }
        if (rank == 0) Calls++;
        _barrier.SignalAndWait(); // nobody overwrites a slot before every rank has read them all
        _slots[rank]!.Dispose();
    }

    /// <summary>Runs <paramref name="body"/> once per rank, each on its own thread, and rethrows the first failure.</summary>
    public static void Run(int worldSize, Action<int> body)
    {
        var errors = new Exception?[worldSize];
        var threads = Enumerable.Range(0, worldSize).Select(r => new Thread(() =>
        {
            try { body(r); }
            catch (Exception e) { errors[r] = e; }
        }, 16 << 20)).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        if (errors.FirstOrDefault(e => e is not null) is { } first) throw new AggregateException(first);
    }

    sealed class RankView(InProcessGroup group, int rank) : ICollectives
    {
        public int Rank => rank;
        public int WorldSize => group._slots.Length;
        public void AllReduceSum(Tensor t) => group.AllReduce(rank, t);
        public IDisposable Watch(string what) => new Nothing();
        sealed class Nothing : IDisposable { public void Dispose() { } }
    }
}
