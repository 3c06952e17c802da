using System.Globalization;
using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Evaluation;

/// <summary>
/// The result of <c>lorakit eval</c>: the base's and every adapter's scores on the same suites, regressions and
/// improvements, and the gate's verdict per adapter. <see cref="ToJson"/> is the documented, stable report format
/// (<c>"format": "lorakit.eval/1"</c>; see the README) that <c>lorakit merge --gate-report</c> and the registry
/// read back through <see cref="GateCheck"/>; eval.html shows the same for people.
/// </summary>
public sealed record EvalReport
{
    /// <summary>The report format's name and version; a reader refuses any other.</summary>
    public const string Format = "lorakit.eval/1";
    public const string JsonFile = "eval.json";
    public const string HtmlFile = "eval.html";

    public required string Model { get; init; }
    public required string BaseFingerprint { get; init; }
    public required IReadOnlyList<EvalSuite> Suites { get; init; }
    public required IReadOnlyList<CaseResult> BaseResults { get; init; }
    public required IReadOnlyList<AdapterEval> Adapters { get; init; }
    public required GateThresholds Thresholds { get; init; }
    /// <summary>Whether the gate was asked for (<c>--gate</c>): its verdict is always computed, but only then sets the exit code.</summary>
    public bool GateEnforced { get; init; }
    /// <summary>Device, dtype, batch size, judge: what produced the numbers.</summary>
    public JsonObject Settings { get; init; } = new();
    public DateTimeOffset Timestamp { get; init; } = DateTimeOffset.UtcNow;

    public Scores BaseScores => Scores.Of(BaseResults);
    /// <summary>Every adapter passed the gate.</summary>
    public bool AllPassed => Adapters.All(a => a.Gate.Passed);

    /// <summary>LoraKit's version (the library's informational version).</summary>
    public static string LoraKitVersion =>
        typeof(EvalReport).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "unknown";

    /// <summary>The report as JSON: <c>{"format", "lorakit_version", "timestamp", "base", "suites", "settings", "gate", "adapters", "cases"}</c>.</summary>
    public JsonObject ToJson() => new()
    {
        ["format"] = Format,
        ["lorakit_version"] = LoraKitVersion,
        ["timestamp"] = Timestamp.ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", CultureInfo.InvariantCulture),
        ["base"] = new JsonObject { ["model"] = Model, ["fingerprint"] = BaseFingerprint, ["scores"] = ScoresJson(BaseResults) },
        ["suites"] = new JsonArray(Suites.Select(s => (JsonNode)new JsonObject
        {
            ["name"] = s.Name, ["path"] = s.Path, ["sha256"] = s.Sha256, ["cases"] = s.Cases.Count,
        }).ToArray()),
        ["settings"] = Settings.DeepClone(),
        ["gate"] = new JsonObject { ["enforced"] = GateEnforced, ["thresholds"] = Thresholds.ToJson() },
        ["adapters"] = new JsonArray(Adapters.Select(a => (JsonNode)AdapterJson(a)).ToArray()),
        ["cases"] = CasesJson(),
    };

    /// <summary>One adapter's entry; <c>registry</c> (name, version, ref, sha256) only for an adapter given by its registered name.</summary>
    JsonObject AdapterJson(AdapterEval a)
    {
        var o = new JsonObject
        {
            ["adapter"] = a.Adapter, ["sha256"] = a.Sha256, ["scores"] = ScoresJson(a.Results),
            ["regressions"] = Keys(a.Comparison.Regressions), ["improvements"] = Keys(a.Comparison.Improvements),
            ["gate"] = a.Gate.ToJson(),
        };
        if (a.Registered is { } g) o["registry"] = new JsonObject { ["name"] = g.Name, ["version"] = g.Version, ["ref"] = g.Ref, ["sha256"] = g.Sha256 };
        return o;
    }

    /// <summary>Overall scores plus the same per suite (<c>"suites": {NAME: {...}}</c>).</summary>
    JsonObject ScoresJson(IReadOnlyList<CaseResult> results)
    {
        var o = Scores.Of(results).ToJson();
        var per = new JsonObject();
        foreach (var s in Suites) per[s.Name] = Scores.Of(results.Where(r => r.Suite == s.Name)).ToJson();
        o["suites"] = per;
        return o;
    }

    /// <summary>Every suite's cases by <see cref="CaseResult.Key"/>.</summary>
    internal Dictionary<string, EvalCase> CasesByKey() =>
        Suites.SelectMany(s => s.Cases.Select(c => (s, c))).ToDictionary(x => CaseResult.KeyOf(x.s.Name, x.c.Id), x => x.c);

    static JsonArray Keys(IEnumerable<CaseResult> rs) => new(rs.Select(r => (JsonNode)r.Key).ToArray());

    /// <summary>Every case with its expectation and each model's outcome side by side.</summary>
    JsonArray CasesJson()
    {
        var byKey = Adapters.Select(a => a.Results.ToDictionary(r => r.Key)).ToList();
        var cases = CasesByKey();
        return new JsonArray(BaseResults.Select(b =>
        {
            var c = cases[b.Key];
            var o = new JsonObject
            {
                ["suite"] = b.Suite, ["id"] = b.Id, ["kind"] = Scores.Name(b.Kind), ["where"] = c.Where,
                ["input"] = c.Prompt ?? c.Text ?? string.Join("\n", c.Messages!.Select(m => $"{m.Role}: {m.Content}")),
                ["expect"] = c.Expect?.Describe(),
                ["base"] = Outcome(b),
                ["adapters"] = new JsonArray(byKey.Select(d => (JsonNode)Outcome(d[b.Key])).ToArray()),
            };
            return (JsonNode)o;
        }).ToArray());
    }

    static JsonObject Outcome(CaseResult r)
    {
        var o = new JsonObject { ["status"] = r.Status.ToString().ToLowerInvariant() };
        if (r.Output is not null) o["output"] = r.Output;
        if (r.Reason is not null) o["reason"] = r.Reason;
        if (r.LogLikelihood is double ll && r.Tokens is int n)
        {
            o["mean_nll"] = n == 0 ? 0 : double.IsFinite(ll) ? -ll / n : null; // JSON has no NaN
            o["tokens"] = n;
        }
        if (r.JudgedBy is not null) o["judged_by"] = r.JudgedBy;
        if (r.GeneratedTokens is int g) o["generated_tokens"] = g;
        return o;
    }

    /// <summary>Writes eval.json and eval.html into <paramref name="dir"/> (created if missing; only these two files are written).</summary>
    public void Write(string dir)
    {
        Directory.CreateDirectory(dir);
        var json = ToJson().ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping });
        WriteAtomically(Path.Combine(dir, JsonFile), json);
        WriteAtomically(Path.Combine(dir, HtmlFile), EvalHtml.Render(this));
    }

    static void WriteAtomically(string path, string text)
    {
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, text);
        File.Move(tmp, path, overwrite: true);
    }
}
