namespace LoraKit.Distributed;

/// <summary>
/// Where this process stands in a data-parallel group, read from the variables torchrun (and SLURM/Kubernetes launchers
/// set up like it) export: <c>RANK</c>, <c>WORLD_SIZE</c>, <c>LOCAL_RANK</c>, <c>MASTER_ADDR</c>, <c>MASTER_PORT</c>.
/// With none of them set the process trains alone (rank 0 of 1). A group of more than one needs all five; a missing or
/// malformed one is a <see cref="DistributedEnvException"/> naming the variable.
/// </summary>
public sealed record DistributedEnv(int Rank, int WorldSize, int LocalRank, string MasterAddr, int MasterPort)
{
    /// <summary>A process training alone: rank 0 of 1, no store, no collectives.</summary>
    public static readonly DistributedEnv Single = new(0, 1, 0, "127.0.0.1", 0);

    /// <summary>Whether this process is one of several (collectives run).</summary>
    public bool IsDistributed => WorldSize > 1;

    /// <summary>Rank 0 alone writes checkpoints, metrics and the report.</summary>
    public bool IsLead => Rank == 0;

    /// <summary>The variables a launcher sets for this rank; <see cref="Read"/> reads them back.</summary>
    public IReadOnlyDictionary<string, string> ToVariables() => new Dictionary<string, string>
    {
        ["RANK"] = Rank.ToString(), ["WORLD_SIZE"] = WorldSize.ToString(), ["LOCAL_RANK"] = LocalRank.ToString(),
        ["MASTER_ADDR"] = MasterAddr, ["MASTER_PORT"] = MasterPort.ToString(),
    };

    /// <summary>The process's own environment.</summary>
    public static DistributedEnv FromEnvironment() => Read(Environment.GetEnvironmentVariable);

    /// <summary>
    /// Reads the group from <paramref name="get"/> (a variable's value or null). WORLD_SIZE unset, or 1, is a single
    /// process; a larger one needs a complete, consistent group.
    /// </summary>
    public static DistributedEnv Read(Func<string, string?> get)
    {
        // WORLD_SIZE decides: a stray RANK alone (some schedulers export one for other purposes) is not a group.
        if (Blank(get("WORLD_SIZE")) is null) return Single;
        int n = Int(get, "WORLD_SIZE", min: 1, max: 1 << 16);
        int r = Int(get, "RANK", min: 0, max: n - 1);
        if (n == 1) return Single;
        // torchrun always sets LOCAL_RANK; a hand-made single-node launch may leave it out, and then it is the rank.
        int local = Blank(get("LOCAL_RANK")) is null ? r : Int(get, "LOCAL_RANK", min: 0, max: 1 << 12);
        string addr = Blank(get("MASTER_ADDR")) ?? throw new DistributedEnvException("MASTER_ADDR is not set: the host of rank 0's store (WORLD_SIZE is " + n + ")");
        int port = Int(get, "MASTER_PORT", min: 1, max: 65535);
        return new DistributedEnv(r, n, local, addr, port);
    }

    static string? Blank(string? s) => string.IsNullOrWhiteSpace(s) ? null : s.Trim();

    static int Int(Func<string, string?> get, string name, int min, int max)
    {
        string? s = Blank(get(name)) ?? throw new DistributedEnvException($"{name} is not set (a distributed run needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)");
        if (!int.TryParse(s, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int v) || v < min || v > max)
            throw new DistributedEnvException($"{name}={s}: expected an integer from {min} to {max}");
        return v;
    }
}

/// <summary>A distributed run's environment or group that is missing, malformed or unreachable (one line naming the variable or peer).</summary>
public sealed class DistributedEnvException(string message, Exception? inner = null) : LoraKitException(message, inner);
