using System.Text.Json.Nodes;
using LoraKit.Lora;
using LoraKit.Training;

namespace LoraKit.Registry;

/// <summary>
/// What the registry records about the run that trained an adapter, read from the run directory's own files
/// (<see cref="RunSummary"/>: manifest, metrics.jsonl, report.json; nothing recomputed), after checking that the adapter
/// being added is one the run wrote: its content must equal the run's final <c>adapter/</c>, its <c>best/</c> or
/// <c>last/</c>, or one of its complete checkpoints (compared by content, so a copy elsewhere is the same adapter; which one it is
/// goes into the lineage). Anything else is an error and nothing is added.
/// </summary>
internal static class RunLineage
{
    /// <summary>A run's lineage before it has a version (and a parent) in the registry.</summary>
    public sealed record Recorded(string RunDir, string AdapterInRun, JsonObject RunConfig, JsonObject Data, JsonObject Metrics,
        double? WallSeconds, string? InitSha256, string? InitRef);

    /// <summary>Reads the run in <paramref name="runDir"/> and checks that the adapter with content hash <paramref name="adapterSha"/> is one of its adapters.</summary>
    public static Recorded Read(string runDir, string adapterDir, string adapterSha)
    {
        RunSummary s;
        try { s = RunSummary.Load(runDir); }
        catch (LoraKitException e) { throw new LoraKitException($"registry: {e.Message}"); }
        string? final = null;
        string? match = null;
        foreach (var rel in Candidates(s.Directory))
        {
            string sha;
            try { sha = AdapterDigest.Compute(Path.Combine(s.Directory, rel)); }
            catch (LoraKitException) { continue; } // not (or no longer) a complete adapter
            if (rel == "adapter") final = sha;
            if (sha == adapterSha) { match = rel; break; }
        }
        if (match is null)
            throw new LoraKitException($"registry: {adapterDir} (sha256 {adapterSha[..12]}) is not an adapter the run in {s.Directory} wrote " +
                                       $"({(final is null ? "it has no final adapter/" : $"its final adapter/ is sha256 {final[..12]}")}, and no best/, last/ or checkpoint matches); give the run that trained it");
        var metrics = new JsonObject
        {
            ["steps"] = s.Steps, ["finished"] = s.Finished,
            ["final"] = Obj(s.Final), ["best"] = s.BestStep is null ? null : Obj(s.Best), ["best_step"] = s.BestStep,
        };
        var data = new JsonObject { ["train"] = s.Data?.DeepClone(), ["validation"] = s.Validation?.DeepClone() };
        return new(s.Directory, match, (JsonObject)s.Config.DeepClone(), data, metrics, s.WallSeconds, Str(s.InitAdapter, "sha256"), Str(s.InitAdapter, "ref"));
    }

    /// <summary>The run's adapter folders (relative), the final one first, then best/, last/ and its complete checkpoints, newest first.</summary>
    static IEnumerable<string> Candidates(string dir)
    {
        foreach (var d in new[] { "adapter", "best", "last" }) if (Directory.Exists(Path.Combine(dir, d))) yield return d;
        foreach (var c in Checkpoints.Complete(dir)) yield return Path.GetRelativePath(dir, c).Replace(Path.DirectorySeparatorChar, '/');
    }

    static JsonObject Obj(IReadOnlyDictionary<string, double> d) => new(d.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value)));

    static string? Str(JsonObject? o, string key) => o?[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
}
