using System.Text.Json.Nodes;

namespace LoraKit.Registry;

/// <summary>
/// One training run as the registry's <c>runs</c> table records it (<see cref="RunLog"/>): its id, output directory
/// (full path; one row per directory), name (the directory's name), status (<c>running</c>, <c>finished</c>,
/// <c>stopped_early</c>, <c>interrupted</c>, <c>failed</c>; a killed run stays <c>running</c>), configuration JSON,
/// base model and fingerprint, start (of its first process) and end (of its last), device, how often it was resumed,
/// and what its directory said when it ended: wall seconds (summed over its processes), steps, tokens, tokens/s, peak
/// memory, final and best metrics (suite scores among them as <c>suite:*</c>), the data descriptions (with sha256 and
/// bytes when report.json has them), cost (wall hours × <c>gpu_hour_cost</c>) and the error of a failed run.
/// </summary>
public sealed record RunRecord(long Id, string OutputDir, string Name, string Status, string Config, string? BaseModel, string? BaseFingerprint,
    string Started, string? Ended, string? Device, int Resumes, double? WallSeconds, int? Steps, long? Tokens, double? TokensPerSecond,
    double? PeakMemoryGib, IReadOnlyDictionary<string, double>? Final, IReadOnlyDictionary<string, double>? Best, int? BestStep,
    JsonObject? Data, double? Cost, string? Error)
{
    /// <summary>The record as JSON (<c>runs list --json</c>): the columns by their names, config and data as objects.</summary>
    public JsonObject ToJson() => new()
    {
        ["id"] = Id, ["name"] = Name, ["output_dir"] = OutputDir, ["status"] = Status, ["started"] = Started, ["ended"] = Ended,
        ["device"] = Device, ["resumes"] = Resumes, ["wall_seconds"] = WallSeconds, ["steps"] = Steps, ["tokens"] = Tokens,
        ["tokens_per_s"] = TokensPerSecond, ["peak_memory_gib"] = PeakMemoryGib, ["cost"] = Cost,
        ["final"] = Obj(Final), ["best"] = Obj(Best), ["best_step"] = BestStep,
        ["base_model"] = BaseModel, ["base_fingerprint"] = BaseFingerprint, ["data"] = Data?.DeepClone(), ["error"] = Error,
        ["config"] = JsonNode.Parse(Config),
    };

    static JsonObject? Obj(IReadOnlyDictionary<string, double>? d) =>
        d is null ? null : new(d.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value)));
}
