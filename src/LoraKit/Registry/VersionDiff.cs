using System.Text.Json.Nodes;

namespace LoraKit.Registry;

/// <summary>One line of a diff: a section (identity, adapter_config, run_config, data, metrics, lineage, evals), a key
/// (dotted for nested values) and the two versions' values as text (null where a version has none).</summary>
public sealed record DiffRow(string Section, string Key, string? Left, string? Right);

/// <summary>
/// What differs between two registered versions, side by side: the identity lines (ref, sha256, base, created) always,
/// then only the values that differ in the adapter config, the run's config, data (paths, hashes, sizes, samples),
/// metrics (final and best, steps, wall time), lineage (the run and the parent) and the attached evaluations (count, gate,
/// the newest report's scores). Nested JSON is compared leaf by leaf under dotted keys; a version added without a run
/// has no values in the run's sections.
/// </summary>
public sealed record VersionDiff(AdapterVersion Left, AdapterVersion Right, IReadOnlyList<DiffRow> Rows)
{
    /// <summary>The sections in the order they are shown.</summary>
    public static readonly IReadOnlyList<string> Sections = ["identity", "adapter_config", "run_config", "data", "metrics", "lineage", "evals"];

    /// <summary>The diff of <paramref name="a"/> and <paramref name="b"/> given their lineage (or null) and evaluation summaries.</summary>
    public static VersionDiff Of(AdapterVersion a, Lineage? la, JsonObject evalsA, AdapterVersion b, Lineage? lb, JsonObject evalsB)
    {
        var rows = new List<DiffRow>
        {
            new("identity", "version", a.Ref, b.Ref),
            new("identity", "sha256", a.Sha256, b.Sha256),
            new("identity", "base", Base(a), Base(b)),
            new("identity", "created", a.Created, b.Created),
        };
        void Section(string section, JsonNode? left, JsonNode? right)
        {
            var l = Flatten(left);
            var r = Flatten(right);
            foreach (var key in l.Keys.Union(r.Keys).Order(StringComparer.Ordinal))
            {
                string? x = l.GetValueOrDefault(key), y = r.GetValueOrDefault(key);
                if (x != y) rows.Add(new(section, key, x, y));
            }
        }
        Section("adapter_config", Parse(a.Config), Parse(b.Config));
        Section("run_config", la?.RunConfig, lb?.RunConfig);
        Section("data", la?.Data, lb?.Data);
        Section("metrics", Metrics(la), Metrics(lb));
        Section("lineage", Origin(la), Origin(lb));
        Section("evals", evalsA, evalsB);
        return new(a, b, rows);
    }

    /// <summary>Whether anything beyond the identity lines differs.</summary>
    public bool Differs => Rows.Any(r => r.Section != "identity");

    /// <summary>The diff as JSON: <c>{"left": {name, version, sha256}, "right": {…}, "rows": [{section, key, left, right}]}</c>.</summary>
    public JsonObject ToJson() => new()
    {
        ["left"] = Side(Left), ["right"] = Side(Right),
        ["rows"] = new JsonArray(Rows.Select(r => (JsonNode)new JsonObject { ["section"] = r.Section, ["key"] = r.Key, ["left"] = r.Left, ["right"] = r.Right }).ToArray()),
    };

    static JsonObject Side(AdapterVersion v) => new() { ["name"] = v.Name, ["version"] = v.Version, ["ref"] = v.Ref, ["sha256"] = v.Sha256 };

    static string Base(AdapterVersion v) =>
        $"{(v.BaseFingerprint is { } fp ? Models.BaseFingerprint.Short(fp) : "(no fingerprint)")}{(v.BaseModel is { } m ? $" {m}" : "")}";

    static JsonNode? Parse(string json)
    {
        try { return JsonNode.Parse(json); }
        catch (System.Text.Json.JsonException) { return JsonValue.Create(json); }
    }

    static JsonObject? Metrics(Lineage? l)
    {
        if (l is null) return null;
        var o = (JsonObject)l.Metrics.DeepClone();
        o["wall_seconds"] = l.WallSeconds;
        return o;
    }

    static JsonObject? Origin(Lineage? l) => l is null ? null : new JsonObject
    {
        ["run_dir"] = l.RunDir, ["adapter_in_run"] = l.AdapterInRun, ["parent"] = l.ParentRef, ["init_adapter_sha256"] = l.InitAdapterSha256,
    };

    /// <summary>Leaf values under dotted keys (arrays as JSON text; strings as they are; null and absent alike left out).</summary>
    static Dictionary<string, string> Flatten(JsonNode? node)
    {
        var into = new Dictionary<string, string>(StringComparer.Ordinal);
        void Walk(JsonNode? n, string prefix)
        {
            if (n is JsonObject o) { foreach (var (k, v) in o) Walk(v, prefix.Length == 0 ? k : $"{prefix}.{k}"); return; }
            if (n is null) return; // absent and null read the same
            into[prefix.Length == 0 ? "value" : prefix] = n is JsonValue jv && jv.TryGetValue<string>(out var s) ? s : n.ToJsonString();
        }
        Walk(node, "");
        return into;
    }
}
