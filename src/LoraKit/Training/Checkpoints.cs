using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>Resumable state besides the weights: where the run is and what it was computed from.</summary>
public sealed record TrainState
{
    public int Version { get; init; } = 1;
    public int Step { get; init; }
    /// <summary>Micro-batches consumed, in units of the run's global micro-batch (batch_size × ranks); see <see cref="SamplesSeen"/>.</summary>
    public long Cursor { get; init; }
    /// <summary>
    /// The data position in global samples (null in checkpoints written before multi-GPU training, whose position is
    /// <see cref="Cursor"/> × batch_size): what a resume with another number of GPUs continues from.
    /// </summary>
    public long? SamplesSeen { get; init; }
    public long OptimizerSteps { get; init; }
    public string RngState { get; init; } = "";
    public string ConfigHash { get; init; } = "";
    public string DataHash { get; init; } = "";
    public JsonObject Config { get; init; } = new();
    public double? BestEvalLoss { get; init; }
    public int? BestStep { get; init; }
    public double? BestAccuracy { get; init; }
    /// <summary>The evaluation suites' metrics at the best step (runs with <c>eval_suite</c>; null in older checkpoints).</summary>
    public Dictionary<string, double>? BestSuites { get; init; }
    public int EvalsWithoutImprovement { get; init; }
    public long TokensSeen { get; init; }
    /// <summary>The run's planned total steps when this checkpoint was written.</summary>
    public int TotalSteps { get; init; }
    /// <summary>The run ended with this checkpoint (its last step, or early stopping).</summary>
    public bool Finished { get; init; }
    public bool StoppedEarly { get; init; }
    /// <summary>The last logged training loss (null before the first step).</summary>
    public double? LastLoss { get; init; }
}

/// <summary>
/// Checkpoints in <c>OUTPUT/checkpoints/step-NNNNNN</c>. Written into a temporary sibling directory, files flushed to
/// disk, renamed into place, and only then the <c>COMPLETE</c> marker written (llm.c's DONE file): resume trusts only
/// directories that have it, so a run killed at any moment leaves either a whole checkpoint or one that is ignored.
/// </summary>
public static class Checkpoints
{
    public const string Marker = "COMPLETE";
    const string StateFile = "trainer_state.json";
    const string OptimizerFile = "optimizer.safetensors";

    public static string Root(string output) => Path.Combine(output, "checkpoints");

    public static string Save(string output, TrainState state, Action<string> writeWeights, AdamW optimizer, RunDirectory? run = null)
    {
        var root = Root(output);
        Directory.CreateDirectory(root);
        var final = Path.Combine(root, $"step-{state.Step:D6}");
        var tmp = Path.Combine(root, $".tmp-step-{state.Step:D6}-{Environment.ProcessId}");
        RunDirectory.ClearDebris(tmp);
        Directory.CreateDirectory(tmp);

        writeWeights(tmp);
        using (var scope = NewDisposeScope()) // the state tensors are views made for this write
            SafetensorsWriter.Save(Path.Combine(tmp, OptimizerFile), optimizer.State());
        WriteDurable(Path.Combine(tmp, StateFile), JsonSerializer.Serialize(state, new JsonSerializerOptions { WriteIndented = true }));

        // A directory of this name may be left by a killed run (no marker) or be a completed one being redone: remove
        // what LoraKit wrote in it; anything else stays, and the new files are moved in beside it.
        if (Directory.Exists(final))
        {
            if (run is not null) run.Clear(final); else RunDirectory.ClearDebris(final);
        }
        if (!Directory.Exists(final)) Directory.Move(tmp, final);
        else
        {
            foreach (var f in Directory.GetFiles(tmp)) File.Move(f, Path.Combine(final, Path.GetFileName(f)), overwrite: true);
            Directory.Delete(tmp);
        }
        WriteDurable(Path.Combine(final, Marker), $"step {state.Step}\n");
        run?.Record(final);
        return final;
    }

    static void WriteDurable(string path, string text)
    {
        using var fs = new FileStream(path, FileMode.Create, FileAccess.Write);
        var bytes = System.Text.Encoding.UTF8.GetBytes(text);
        fs.Write(bytes);
        fs.Flush(flushToDisk: true);
    }

    /// <summary>The newest checkpoint that has its completion marker, or null.</summary>
    public static string? Latest(string output) => Complete(output).FirstOrDefault();

    /// <summary>The checkpoints that have their completion marker, newest first.</summary>
    public static List<string> Complete(string output)
    {
        var root = Root(output);
        if (!Directory.Exists(root)) return [];
        return Directory.GetDirectories(root, "step-*")
            .Where(d => File.Exists(Path.Combine(d, Marker)))
            .OrderByDescending(d => d, StringComparer.Ordinal)
            .ToList();
    }

    /// <summary>
    /// The newest complete checkpoint whose files are readable (state parses, weight and optimizer headers are whole);
    /// each one skipped is reported through <paramref name="skipped"/> with the reason.
    /// </summary>
    public static (string dir, TrainState state)? LatestReadable(string output, string weightsFile, Action<string> skipped)
    {
        foreach (var dir in Complete(output))
        {
            try
            {
                var state = ReadState(dir);
                using (SafetensorsFile.Open(Path.Combine(dir, weightsFile))) { }
                using (SafetensorsFile.Open(Path.Combine(dir, OptimizerFile))) { }
                return (dir, state);
            }
            catch (LoraKitException e) { skipped($"{e.Message}; using an earlier checkpoint"); }
        }
        return null;
    }

    public static TrainState ReadState(string dir)
    {
        var path = Path.Combine(dir, StateFile);
        if (!File.Exists(path)) throw new LoraKitException($"{path}: missing (the checkpoint is incomplete)");
        TrainState? state;
        try { state = JsonSerializer.Deserialize<TrainState>(IO.JsonFiles.ReadText(path)); }
        catch (Exception e) when (e is JsonException or NotSupportedException or ArgumentException)
        {
            throw new LoraKitException($"{path}: truncated or invalid JSON" + (e is JsonException { LineNumber: long l } ? $" at line {l + 1}" : ""));
        }
        if (state is null) throw new LoraKitException($"{path}: empty state");
        if (state.Version != 1) throw new LoraKitException($"{path}: state version {state.Version} is not supported (this LoraKit reads version 1)");
        if (state.Step < 1 || state.ConfigHash.Length == 0) throw new LoraKitException($"{path}: incomplete state (step {state.Step})");
        return state;
    }

    public static void RestoreOptimizer(string dir, AdamW optimizer, long steps)
    {
        using var f = SafetensorsFile.Open(Path.Combine(dir, OptimizerFile));
        optimizer.Restore(name => f.Entries.ContainsKey(name) ? f.Read(name) : null, steps);
    }

    /// <summary>Keeps the newest <paramref name="keep"/> complete checkpoints (plus <paramref name="protect"/>) and removes stale temporaries.</summary>
    public static void Prune(string output, int keep, string? protect, RunDirectory? run = null)
    {
        var root = Root(output);
        foreach (var tmp in Directory.GetDirectories(root, ".tmp-step-*")) RunDirectory.ClearDebris(tmp);
        foreach (var d in Complete(output).Skip(keep))
            if (protect is null || Path.GetFullPath(d) != Path.GetFullPath(protect))
            {
                if (run is not null) run.Clear(d); else RunDirectory.ClearDebris(d);
            }
    }

    public static string EncodeRng(Runtime.RngStream rng) => Convert.ToBase64String(rng.State());

    public static void RestoreRng(string encoded, Runtime.RngStream rng)
    {
        if (string.IsNullOrEmpty(encoded)) return;
        byte[] bytes;
        try { bytes = Convert.FromBase64String(encoded); }
        catch (FormatException) { throw new LoraKitException($"{StateFile}: rng_state is not base64"); }
        try { rng.Restore(bytes); }
        catch (Exception e) when (e is not LoraKitException) { throw new LoraKitException($"{StateFile}: rng_state does not fit this device's generator ({bytes.Length} bytes)"); }
    }
}
