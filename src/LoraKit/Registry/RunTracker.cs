using LoraKit.Training;

namespace LoraKit.Registry;

/// <summary>
/// The <see cref="IRunTracker"/> <c>lorakit train</c> records every run through: a row in the registry's <c>runs</c>
/// table (<see cref="RunLog"/>) when the run starts, completed from the run directory (<see cref="RunSummary"/>) when it
/// ends. It never throws: a registry that cannot be opened or written costs one warning through
/// <paramref name="warn"/> and the run trains on unrecorded. The database is opened for each write and closed again, so
/// a long run holds no handle on it.
/// </summary>
public sealed class RunTracker(string? registryPath, Action<string> warn) : IRunTracker
{
    long? _id;
    DateTimeOffset _started;
    bool _warned;

    /// <summary>The run's id in the registry once recorded, else null.</summary>
    public long? RunId => _id;

    /// <inheritdoc/>
    public void Started(RunStart start)
    {
        _started = start.Started;
        Try(() => { using var log = RunLog.Open(registryPath); _id = log.Start(start); });
    }

    /// <inheritdoc/>
    public void Ended(RunEnd end)
    {
        if (_id is not long id) return;
        RunSummary? summary = null;
        try { summary = RunSummary.Load(end.OutputDir); }
        catch (Exception) { } // the row keeps what it has; Ended runs in the trainer's finally, where a throw would replace the run's own outcome
        // This process's wall time: the report's when this process wrote it (so row and report.json agree), else start to end.
        double seconds = summary is { Finished: true, WallSeconds: double w } && summary.Started == TrainReport.Iso(_started) ? w : (end.Ended - _started).TotalSeconds;
        Try(() => { using var log = RunLog.Open(registryPath); log.End(id, end, seconds, summary); });
    }

    void Try(Action write)
    {
        try { write(); }
        catch (Exception e)
        {
            if (_warned) return;
            _warned = true;
            string root = registryPath ?? AdapterStore.DefaultPath();
            warn($"the run is not recorded in the registry at {root}: {e.Message.ReplaceLineEndings(" ")}");
        }
    }
}
