using System.Text.Json.Nodes;

namespace LoraKit.Training;

/// <summary>One row of a comparison: a config key or metric and each run's value (null where a run has none).</summary>
public sealed record ComparisonRow(string Key, IReadOnlyList<string?> Values);

/// <summary>
/// N runs side by side: the config keys whose values differ (nested keys as <c>a.b</c>; <c>output</c> left out, as it
/// always differs and the run names already say it) and the metrics that differ: final and best evaluation metrics,
/// final train loss, steps, wall time, tokens/s, peak memory, cost, device, the data's sha256 (when recorded). A value a run lacks counts as differing from one it has.
/// </summary>
public sealed class RunComparison
{
    /// <summary>Config keys never compared: where a run was written, not what it computed.</summary>
    static readonly HashSet<string> Ignored = ["output"];

    /// <summary>The runs, in the order given; names made unique (<c>name#2</c>) so legends and columns tell them apart.</summary>
    public IReadOnlyList<RunSummary> Runs { get; }
    /// <summary>Config keys whose values differ between the runs.</summary>
    public IReadOnlyList<ComparisonRow> Config { get; }
    /// <summary>Metrics whose values differ between the runs.</summary>
    public IReadOnlyList<ComparisonRow> Metrics { get; }

    RunComparison(IReadOnlyList<RunSummary> runs)
    {
        Runs = runs;
        Config = Differing(runs.Select(r => Flatten(r.Config)).ToList());
        Metrics = Differing(runs.Select(MetricValues).ToList());
    }

    /// <summary>Compares the runs in <paramref name="dirs"/> (at least two).</summary>
    public static RunComparison Load(IReadOnlyList<string> dirs)
    {
        if (dirs.Count < 2) throw new LoraKitException("compare needs at least two run directories");
        var runs = dirs.Select(RunSummary.Load).ToList();
        var seen = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < runs.Count; i++)
        {
            int n = seen[runs[i].Name] = seen.GetValueOrDefault(runs[i].Name) + 1;
            if (n > 1) runs[i] = Renamed(runs[i], $"{runs[i].Name}#{n}");
        }
        return new RunComparison(runs);
    }

    static RunSummary Renamed(RunSummary r, string name) => new()
    {
        Name = name, Directory = r.Directory, Config = r.Config, Finished = r.Finished, Steps = r.Steps, WallSeconds = r.WallSeconds,
        Tokens = r.Tokens, TokensPerSecond = r.TokensPerSecond, PeakMemoryGib = r.PeakMemoryGib, PeakMemoryKind = r.PeakMemoryKind,
        Started = r.Started, Ended = r.Ended, Device = r.Device, DeviceName = r.DeviceName, DType = r.DType, Cost = r.Cost,
        Data = r.Data, Validation = r.Validation, InitAdapter = r.InitAdapter,
        TrainLoss = r.TrainLoss, Evals = r.Evals, Best = r.Best, BestStep = r.BestStep,
    };

    /// <summary>The metrics compared, as text: numbers round-trippable, so equal means equal.</summary>
    static Dictionary<string, string?> MetricValues(RunSummary r)
    {
        var d = new Dictionary<string, string?>(StringComparer.Ordinal)
        {
            ["steps"] = r.Steps.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["wall_seconds"] = N(r.WallSeconds), ["tokens"] = r.Tokens?.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["tokens_per_s"] = N(r.TokensPerSecond), ["peak_memory_gib"] = N(r.PeakMemoryGib), ["cost"] = N(r.Cost),
            ["device"] = r.Device is null ? null : $"{r.Device}{(r.DeviceName is null ? "" : $" ({r.DeviceName})")}, {r.DType}",
            ["data sha256"] = r.Data?["sha256"]?.ToString(),
        };
        foreach (var (k, v) in r.Final) d[$"final {k}"] = N(v);
        foreach (var (k, v) in r.Best) d[$"best {k}"] = N(v);
        return d;
    }

    static string? N(double? x) => x?.ToString("R", System.Globalization.CultureInfo.InvariantCulture);

    static List<ComparisonRow> Differing(List<Dictionary<string, string?>> perRun)
    {
        var keys = perRun.SelectMany(d => d.Keys).Distinct().Where(k => !Ignored.Contains(k)).ToList();
        return keys.Select(k => new ComparisonRow(k, perRun.Select(d => d.GetValueOrDefault(k)).ToList()))
                   .Where(row => row.Values.Distinct().Count() > 1).ToList();
    }

    /// <summary>A config as key → JSON text, nested objects as <c>a.b</c> (arrays compared whole).</summary>
    static Dictionary<string, string?> Flatten(JsonObject o)
    {
        var d = new Dictionary<string, string?>(StringComparer.Ordinal);
        void Walk(JsonObject obj, string prefix)
        {
            foreach (var (k, v) in obj)
                if (v is JsonObject inner) Walk(inner, prefix + k + ".");
                else d[prefix + k] = v?.ToJsonString();
        }
        Walk(o, "");
        return d;
    }

    /// <summary>The comparison as JSON: the runs' summaries and the differing rows (key → one value per run, as JSON values).</summary>
    public JsonObject ToJson() => new()
    {
        ["runs"] = new JsonArray(Runs.Select(r => (JsonNode)r.ToJson()).ToArray()),
        ["config_differences"] = Rows(Config),
        ["metric_differences"] = Rows(Metrics),
    };

    static JsonObject Rows(IReadOnlyList<ComparisonRow> rows) =>
        new(rows.Select(r => KeyValuePair.Create(r.Key, (JsonNode?)new JsonArray(r.Values.Select(v => v is null ? null : JsonNode.Parse(v)).ToArray()))));
}
