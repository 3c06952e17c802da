using System.Text.Json.Nodes;
using LoraKit.Evaluation;
using LoraKit.Lora;
using LoraKit.Models;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit merge</c>'s gate: a merge needs a passed gate for this adapter on this base (<c>--gate-report</c>), or
/// <c>--no-gate</c>, which is warned about and recorded. Either way what was decided goes into the merged config.json
/// (<c>lorakit_merge</c>), so a merged checkpoint says whether anyone checked it.
/// </summary>
public static class MergeGate
{
    /// <summary>Checks the gate before any weights are loaded; returns the provenance to record.</summary>
    public static JsonObject Check(string modelDir, string adapterDir, string? report, bool noGate)
    {
        if (report is not null && noGate) throw new LoraKitException("give either --gate-report or --no-gate, not both");
        IO.ModelDirectory.Require(modelDir);
        if (!Directory.Exists(adapterDir)) throw new LoraKitException($"adapter directory '{adapterDir}' does not exist");
        string sha = AdapterDigest.Compute(adapterDir);
        string fingerprint = BaseFingerprint.Of(modelDir);
        var provenance = new JsonObject
        {
            ["adapter"] = Path.GetFullPath(adapterDir), ["adapter_sha256"] = sha, ["base_fingerprint"] = fingerprint,
            ["lorakit_version"] = EvalReport.LoraKitVersion,
        };
        if (noGate)
        {
            Console.Error.WriteLine($"warning: merging {adapterDir} WITHOUT an evaluation gate (--no-gate): nothing checked that it keeps the base's " +
                                    "capabilities and safety; the merged config.json records this (lorakit_merge.gate = \"skipped\")");
            provenance["gate"] = "skipped";
            return provenance;
        }
        if (report is null)
            throw new GateException($"merging needs a passed evaluation gate: run `lorakit eval --model {modelDir} --adapter {adapterDir} --suite FILE --gate --output DIR`, " +
                                    "then `lorakit merge … --gate-report DIR/eval.json` (or --no-gate to merge unchecked, recorded)");
        var evidence = GateCheck.Require(report, sha, fingerprint);
        provenance["gate"] = "passed";
        provenance["gate_report"] = evidence.Report;
        provenance["gate_report_timestamp"] = evidence.Timestamp;
        provenance["gate_thresholds"] = evidence.Thresholds;
        provenance["suites"] = new JsonArray(evidence.Suites.Select(s => (JsonNode)new JsonObject { ["name"] = s.Name, ["sha256"] = s.Sha256 }).ToArray());
        return provenance;
    }
}
