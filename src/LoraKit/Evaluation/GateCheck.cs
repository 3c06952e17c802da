using System.Text.Json.Nodes;
using LoraKit.IO;

namespace LoraKit.Evaluation;

/// <summary>A merge or promotion refused for want of a passed gate; the message says what the report lacks.</summary>
public sealed class GateException(string message) : LoraKitException(message);

/// <summary>
/// Reads a gate report (eval.json, format <see cref="EvalReport.Format"/>) back and checks that it holds a passed gate
/// for exactly this adapter (its content hash, <see cref="Lora.AdapterDigest"/>) on exactly this base (its
/// fingerprint, <see cref="Models.BaseFingerprint"/>): <c>lorakit merge --gate-report</c> and registry promotion rest
/// on it. The report is untrusted input: it must be a regular file (a pipe is refused in bounded time), it is
/// size-bounded, every field it relies on is checked (a gate passes only as the JSON boolean <c>true</c>), every entry
/// for this adapter must have passed (duplicates cannot outvote a failure), and text quoted from it in an error is
/// cut to one short line. FuzzGateReportTests holds it to that.
/// </summary>
public static class GateCheck
{
    const long MaxReportBytes = 256L << 20;
    static readonly TimeSpan OpenTimeout = TimeSpan.FromSeconds(5);

    /// <summary>
    /// What a passed check found: the report's timestamp, the suites it ran (name and sha256) and the thresholds its gate
    /// was decided with (a copy of <c>gate.thresholds</c>, or null): a gate passed at loosened thresholds is still a pass,
    /// so whoever records the check records them too.
    /// </summary>
    public sealed record Evidence(string Report, string Timestamp, IReadOnlyList<(string Name, string Sha256)> Suites, JsonObject? Thresholds = null);

    /// <summary>The report file a path names (a directory: its eval.json).</summary>
    public static string ReportFile(string path) => Directory.Exists(path) ? Path.Combine(path, EvalReport.JsonFile) : path;

    /// <summary>
    /// Reads a report (a file, or a directory holding eval.json) the way every reader must: opened in bounded time (a
    /// pipe is refused), size-bounded, its format checked. Returns the file, the JSON and the base fingerprint; any
    /// problem is a <see cref="GateException"/>.
    /// </summary>
    public static (string File, JsonObject Root, string BaseFingerprint) Read(string reportPath)
    {
        reportPath = ReportFile(reportPath);
        JsonNode? root;
        byte[] bytes;
        using (var fs = FileProblem.OpenPromptly(reportPath, OpenTimeout)) bytes = FileProblem.ReadAllBytes(fs, reportPath, MaxReportBytes);
        try { root = JsonNode.Parse(bytes, documentOptions: JsonFiles.Options); }
        catch (System.Text.Json.JsonException e) { throw new GateException($"{reportPath}: not a LoraKit evaluation report: {JsonFiles.Describe(e)}"); }
        if (root is not JsonObject o || Str(o, "format") != EvalReport.Format)
            throw new GateException($"{reportPath}: not a LoraKit evaluation report (no \"format\": \"{EvalReport.Format}\"); make one with `lorakit eval --output DIR`");
        string reportBase = Str(o["base"] as JsonObject, "fingerprint") ?? throw new GateException($"{reportPath}: the report has no base fingerprint");
        return (reportPath, o, reportBase);
    }

    /// <summary>Throws <see cref="GateException"/> unless <paramref name="reportPath"/> holds a passed gate for the adapter and base.</summary>
    public static Evidence Require(string reportPath, string adapterSha256, string baseFingerprint)
    {
        var (path, o, reportBase) = Read(reportPath);
        reportPath = path;
        if (reportBase != baseFingerprint)
            throw new GateException($"{reportPath}: the report was made on another base model (fingerprint {Quote(Models.BaseFingerprint.Short(reportBase))}, " +
                                    $"this base is {Models.BaseFingerprint.Short(baseFingerprint)}); evaluate the adapter on this base");
        var entries = (o["adapters"] as JsonArray ?? []).OfType<JsonObject>().ToList();
        var mine = entries.Where(a => Str(a, "sha256") == adapterSha256).ToList();
        if (mine.Count == 0)
            throw new GateException($"{reportPath}: the report does not cover this adapter (sha256 {Short(adapterSha256)}; it covers " +
                                    $"{(entries.Count == 0 ? "none" : Quote(string.Join(", ", entries.Take(10).Select(a => Short(Str(a, "sha256") ?? "?")))))}); evaluate this adapter");
        // An adapter evaluated twice in one report (given twice, or a report edited by hand) must pass every time.
        foreach (var entry in mine)
        {
            var gate = entry["gate"] as JsonObject;
            bool passed = gate?["passed"] is JsonValue v && v.GetValueKind() == System.Text.Json.JsonValueKind.True;
            if (passed) continue;
            var reasons = (gate?["reasons"] as JsonArray ?? []).Select(x => x is JsonValue s && s.TryGetValue<string>(out var t) ? t : "").Where(t => t.Length > 0);
            throw new GateException($"{reportPath}: the adapter failed the gate: {Quote(string.Join("; ", reasons.DefaultIfEmpty("no reason recorded")))}");
        }
        var suites = (o["suites"] as JsonArray ?? []).OfType<JsonObject>().Select(s => (Str(s, "name") ?? "?", Str(s, "sha256") ?? "?")).ToList();
        return new Evidence(Path.GetFullPath(reportPath), Str(o, "timestamp") ?? "", suites, (o["gate"] as JsonObject)?["thresholds"] is JsonObject t ? (JsonObject)t.DeepClone() : null);
    }

    static string? Str(JsonObject? o, string key) => o?[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
    static string Short(string sha) => sha.Length > 12 ? sha[..12] : sha;

    /// <summary>Text from the report quoted in an error: control characters (newlines) become spaces, and it is cut short.</summary>
    static string Quote(string s)
    {
        const int Max = 600;
        var clean = new string(s.Select(ch => char.IsControl(ch) ? ' ' : ch).ToArray());
        return clean.Length <= Max ? clean : clean[..Max] + " …";
    }
}
