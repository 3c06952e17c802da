using System.Text.Json.Nodes;

namespace LoraKit.Training;

/// <summary>
/// Where and how a training run ran, measured by the trainer and written to report.json: start and end (UTC), the
/// device ("cpu", "cuda:0"), the GPU's name when known, the base's dtype, the tokens trained (cumulative over resumes),
/// the tokens per second of this process's training loop (model load left out), and peak memory with its kind
/// (<c>cuda_max_allocated</c>: libtorch's allocator; <c>process_peak_working_set</c>: the whole process on CPU).
/// </summary>
public sealed record RunStats(DateTimeOffset Started, DateTimeOffset Ended, string Device, string? DeviceName, string DType,
    long Tokens, double TokensPerSecond, double? PeakMemoryGib, string? PeakMemoryKind)
{
    /// <summary>The device as one phrase for people: "cuda:0 (NVIDIA H200), bf16" or "cpu, fp32".</summary>
    public string Describe() => $"{Device}{(DeviceName is null ? "" : $" ({DeviceName})")}, {DType}";

    /// <summary>
    /// What <paramref name="wallSeconds"/> cost at <paramref name="hourCost"/> per GPU-hour (the config's
    /// <c>gpu_hour_cost</c>): hours × rate, rounded to 1e-6. A CPU run is billed by its wall hours the same way (the report
    /// names the device beside it); null without a rate.
    /// </summary>
    public static double? Cost(double wallSeconds, double? hourCost) =>
        hourCost is double rate ? Math.Round(wallSeconds / 3600 * rate, 6) : null;
}

/// <summary>
/// A run as it starts, for an <see cref="IRunTracker"/>: its output directory (full path), name (the directory's name),
/// configuration (TrainConfig's JSON names), base model directory and fingerprint (null when it cannot be read), start
/// time, device and whether it resumes a run in that directory.
/// </summary>
public sealed record RunStart(string OutputDir, string Name, JsonObject Config, string BaseModel, string? BaseFingerprint,
    DateTimeOffset Started, string Device, bool Resumed);

/// <summary>
/// How a run ended: <c>finished</c>, <c>stopped_early</c>, <c>interrupted</c> (Ctrl+C or SIGTERM: a checkpoint was
/// saved) or <c>failed</c> (with the error's message). A process that is killed outright reports nothing: its run stays
/// <c>running</c>.
/// </summary>
public sealed record RunEnd(string OutputDir, string Status, DateTimeOffset Ended, string? Error = null)
{
    public const string Finished = "finished", StoppedEarly = "stopped_early", Interrupted = "interrupted", Failed = "failed", Running = "running";
}

/// <summary>
/// Records training runs somewhere (the registry's <c>runs</c> table implements it; Training does not know the registry).
/// <see cref="Trainer.Run"/> calls <see cref="Started"/> once the output directory is open and <see cref="Ended"/> when
/// it returns or throws; the run's metrics are in its directory by then (<see cref="RunSummary.Load"/>). A tracker must
/// not throw: a run whose record cannot be written still trains.
/// </summary>
public interface IRunTracker
{
    /// <summary>The run started (or resumed) in <see cref="RunStart.OutputDir"/>.</summary>
    void Started(RunStart start);

    /// <summary>The run ended; called only after <see cref="Started"/>.</summary>
    void Ended(RunEnd end);
}
