using System.Globalization;

namespace LoraKit.Distributed;

/// <summary>
/// A joined data-parallel group: the store connection and the collectives. <see cref="Join"/> connects every rank to
/// rank 0's <see cref="TcpStore"/> (rank 0 serves it), waits for all at a barrier, and builds NCCL collectives for a
/// GPU run or store collectives for a CPU one. <see cref="Finish"/> is a last barrier after a successful run, so rank 0's
/// store outlives every rank's last collective. Timeouts: <c>LORAKIT_NCCL_TIMEOUT</c> seconds (default 600, as
/// torch's NCCL default) for collectives and joining.
/// </summary>
public sealed class ProcessGroup : IDisposable
{
    readonly TcpStore _store;
    readonly IDisposable? _owned;

    ProcessGroup(DistributedEnv env, TcpStore store, ICollectives collectives)
    {
        (Env, _store, Collectives) = (env, store, collectives);
        _owned = collectives as IDisposable;
    }

    /// <summary>Where this process stands.</summary>
    public DistributedEnv Env { get; }

    /// <summary>The group's collectives (NCCL on GPUs, the store on CPU).</summary>
    public ICollectives Collectives { get; }

    /// <summary>The collectives' timeout: <c>LORAKIT_NCCL_TIMEOUT</c> seconds, 600 when unset.</summary>
    public static TimeSpan TimeoutFromEnvironment()
    {
        var s = Environment.GetEnvironmentVariable("LORAKIT_NCCL_TIMEOUT");
        if (string.IsNullOrWhiteSpace(s)) return TimeSpan.FromSeconds(600);
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double secs) || !(secs > 0) || secs > 86400 * 7)
            throw new DistributedEnvException($"LORAKIT_NCCL_TIMEOUT={s}: expected a number of seconds above 0");
        return TimeSpan.FromSeconds(secs);
    }

    /// <summary>
    /// Joins the group <paramref name="env"/> describes. With <paramref name="cuda"/> the process's GPU becomes
    /// LOCAL_RANK and the collectives are NCCL's; without, they go through the store (CPU).
    /// </summary>
    public static ProcessGroup Join(DistributedEnv env, bool cuda, TimeSpan timeout)
    {
        if (!env.IsDistributed) throw new ArgumentException("a single process has no group to join");
        if (cuda) CudaDevice.MakeCurrent(env.LocalRank);
        var store = TcpStore.Connect(env.MasterAddr, env.MasterPort, timeout, serve: env.IsLead);
        try
        {
            store.Barrier("join", env.WorldSize);
            ICollectives c = cuda ? NcclCollectives.Create(store, env, timeout) : new StoreCollectives(store, env.Rank, env.WorldSize, timeout);
            return new ProcessGroup(env, store, c);
        }
        catch
        {
            store.Dispose();
            throw;
        }
    }

    /// <summary>After a successful run: waits for every rank, so rank 0's store is not closed under a rank's last collective.</summary>
    public void Finish() => _store.Barrier("finish", Env.WorldSize);

    /// <summary>Tears the collectives and the store connection down (rank 0's store stops serving).</summary>
    public void Dispose()
    {
        _owned?.Dispose();
        _store.Dispose();
    }
}
