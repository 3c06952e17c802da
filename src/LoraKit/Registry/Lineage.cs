using System.Text.Json.Nodes;

namespace LoraKit.Registry;

/// <summary>
/// Where a registered version came from, as recorded when it was added with the run that trained it
/// (<see cref="AdapterStore.Add"/> with a run directory, or <c>lorakit train --register</c>): the run directory and which of
/// its adapters this is (<c>adapter</c>, <c>best</c>, <c>last</c> or a checkpoint), the run's config, its data files
/// (<c>train</c> and <c>validation</c>: path, samples, tokens, sha256, bytes), its metrics (<c>final</c>, <c>best</c>,
/// <c>best_step</c>, <c>steps</c>), wall time, and the adapter it started from: its content hash, the registry ref the
/// run recorded for it, and the registered version that holds that content (<see cref="ParentName"/>@<see cref="ParentVersion"/>,
/// null when no version in this registry does).
/// </summary>
public sealed record Lineage(string Name, int Version, string RunDir, string AdapterInRun, JsonObject RunConfig, JsonObject Data,
    JsonObject Metrics, double? WallSeconds, string? InitAdapterSha256, string? InitAdapterRef, string? ParentName, int? ParentVersion, string Added)
{
    /// <summary>"NAME@VERSION" of the parent version, or null.</summary>
    public string? ParentRef => ParentName is null ? null : $"{ParentName}@{ParentVersion}";

    /// <summary>The lineage as JSON (<c>registry show --json</c>, <c>registry diff --json</c>).</summary>
    public JsonObject ToJson() => new()
    {
        ["run_dir"] = RunDir, ["adapter_in_run"] = AdapterInRun, ["run_config"] = RunConfig.DeepClone(), ["data"] = Data.DeepClone(),
        ["metrics"] = Metrics.DeepClone(), ["wall_seconds"] = WallSeconds,
        ["init_adapter"] = InitAdapterSha256 is null ? null : new JsonObject { ["sha256"] = InitAdapterSha256, ["ref"] = InitAdapterRef },
        ["parent"] = ParentName is null ? null : new JsonObject { ["name"] = ParentName, ["version"] = ParentVersion, ["ref"] = ParentRef },
        ["added"] = Added,
    };
}
