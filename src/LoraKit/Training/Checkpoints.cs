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
    public long Cursor { get; init; }
    public long OptimizerSteps { get; init; }
    public string RngState { get; init; } = "";
    public string ConfigHash { get; init; } = "";
    public string DataHash { get; init; } = "";
    public JsonObject Config { get; init; } = new();
    public double? BestEvalLoss { get; init; }
    public int? BestStep { get; init; }
    public double? BestAccuracy { get; init; }
    public int EvalsWithoutImprovement { get; init; }
    public long TokensSeen { get; init; }
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

    public static string Save(string output, TrainState state, Action<string> writeWeights, AdamW optimizer)
    {
        var root = Root(output);
        Directory.CreateDirectory(root);
        var final = Path.Combine(root, $"step-{state.Step:D6}");
        var tmp = Path.Combine(root, $".tmp-step-{state.Step:D6}-{Environment.ProcessId}");
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);

        writeWeights(tmp);
        using (var scope = NewDisposeScope()) // the state tensors are views made for this write
            SafetensorsWriter.Save(Path.Combine(tmp, OptimizerFile), optimizer.State());
        WriteDurable(Path.Combine(tmp, StateFile), JsonSerializer.Serialize(state, new JsonSerializerOptions { WriteIndented = true }));

        if (Directory.Exists(final)) Directory.Delete(final, true);
        Directory.Move(tmp, final);
        WriteDurable(Path.Combine(final, Marker), $"step {state.Step}\n");
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
    public static string? Latest(string output)
    {
        var root = Root(output);
        if (!Directory.Exists(root)) return null;
        return Directory.GetDirectories(root, "step-*")
            .Where(d => File.Exists(Path.Combine(d, Marker)))
            .OrderByDescending(d => d, StringComparer.Ordinal)
            .FirstOrDefault();
    }

    public static TrainState ReadState(string dir) =>
        JsonSerializer.Deserialize<TrainState>(File.ReadAllText(Path.Combine(dir, StateFile)))
        ?? throw new InvalidDataException($"{dir}: unreadable {StateFile}");

    public static void RestoreOptimizer(string dir, AdamW optimizer, long steps)
    {
        using var f = SafetensorsFile.Open(Path.Combine(dir, OptimizerFile));
        optimizer.Restore(name => f.Entries.ContainsKey(name) ? f.Read(name) : null, steps);
    }

    /// <summary>Keeps the newest <paramref name="keep"/> complete checkpoints (plus <paramref name="protect"/>) and removes stale temporaries.</summary>
    public static void Prune(string output, int keep, string? protect)
    {
        var root = Root(output);
        foreach (var tmp in Directory.GetDirectories(root, ".tmp-step-*")) Directory.Delete(tmp, true);
        var complete = Directory.GetDirectories(root, "step-*").Where(d => File.Exists(Path.Combine(d, Marker)))
            .OrderByDescending(d => d, StringComparer.Ordinal).ToList();
        foreach (var d in complete.Skip(keep))
            if (protect is null || Path.GetFullPath(d) != Path.GetFullPath(protect)) Directory.Delete(d, true);
    }

    public static string EncodeRng()
    {
        using var state = random.get_rng_state();
        return Convert.ToBase64String(state.bytes.ToArray());
    }

    public static void RestoreRng(string encoded)
    {
        if (string.IsNullOrEmpty(encoded)) return;
        var bytes = Convert.FromBase64String(encoded);
        using var t = empty(bytes.Length, ScalarType.Byte);
        t.bytes = bytes;
        random.set_rng_state(t);
    }
}
