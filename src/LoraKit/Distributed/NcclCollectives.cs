using static TorchSharp.torch;

namespace LoraKit.Distributed;

/// <summary>
/// The GPU process group: one <see cref="NcclComm"/> bootstrapped through the <see cref="TcpStore"/> (rank 0 makes the
/// unique id and sets it; the others wait for it there, under the store's deadline) and a
/// <see cref="CollectiveWatchdog"/> that ends the process when armed work stalls or NCCL reports an error.
/// </summary>
public sealed class NcclCollectives : ICollectives, IDisposable
{
    readonly NcclComm _comm;
    readonly CollectiveWatchdog _watchdog;

    NcclCollectives(NcclComm comm, int rank, int world, CollectiveWatchdog watchdog)
    {
        (_comm, Rank, WorldSize, _watchdog) = (comm, rank, world, watchdog);
    }

    /// <inheritdoc/>
    public int Rank { get; }
    /// <inheritdoc/>
    public int WorldSize { get; }

    /// <summary>Joins the group of <paramref name="env"/>; the rank's GPU must already be current (<see cref="CudaDevice.MakeCurrent"/>).</summary>
    public static NcclCollectives Create(TcpStore store, DistributedEnv env, TimeSpan timeout)
    {
        _ = NcclLibrary.Handle; // a missing library is one line before anything waits on the others
        byte[] id;
        if (env.IsLead) store.Set("nccl/unique-id", id = NcclComm.NewUniqueId());
        else id = store.Get("nccl/unique-id");
        NcclComm? comm = null;
        // ncclCommInitRank waits for every rank; a rank that dies in between must not leave the others there.
        using var initDog = new CollectiveWatchdog(timeout, () => null, reason => CollectiveWatchdog.AbortAndExit(env.Rank, reason, () => comm?.Abort()));
        using (initDog.Arm("NCCL initialisation"))
            comm = NcclComm.Init(env.WorldSize, id, env.Rank);
        var dog = new CollectiveWatchdog(timeout, comm.AsyncError, reason => CollectiveWatchdog.AbortAndExit(env.Rank, reason, comm.Abort));
        return new NcclCollectives(comm, env.Rank, env.WorldSize, dog);
    }

    /// <inheritdoc/>
    public void AllReduceSum(Tensor t) => _comm.AllReduceSum(t);

    /// <inheritdoc/>
    public IDisposable Watch(string what) => _watchdog.Arm(what);

    /// <summary>Stops the watchdog and destroys the communicator.</summary>
    public void Dispose()
    {
        _watchdog.Dispose();
        _comm.Dispose();
    }
}
