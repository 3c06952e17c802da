using System.Text.Json.Nodes;
using Microsoft.Data.Sqlite;

namespace LoraKit.Registry;

// The registry's lineage part (AdapterStore's summary documents the type): the run that trained a version (Lineage,
// recorded by Add with a run directory, first record kept), its parent version, and the diff of two versions over all of it.
public sealed partial class AdapterStore
{
    /// <summary>The lineage recorded for the version <paramref name="reference"/> names, or null when it was added without a run.</summary>
    public Lineage? LineageOf(string reference)
    {
        var v = Resolve(reference);
        return LineageOf(v.Name, v.Version).FirstOrDefault();
    }

    /// <summary>
    /// What differs between two versions (of one name or of two): their identity (always), adapter config, the run's
    /// config, data, metrics and parent from their lineage, and their attached evaluations (<see cref="VersionDiff"/>).
    /// </summary>
    public VersionDiff Diff(string left, string right)
    {
        var a = Resolve(left);
        var b = Resolve(right);
        return VersionDiff.Of(a, LineageOf(a.Name, a.Version).FirstOrDefault(), EvalSummary(a), b, LineageOf(b.Name, b.Version).FirstOrDefault(), EvalSummary(b));
    }

    /// <summary>
    /// Records a run's lineage for (name, version) unless the version has one already (the first stays); the parent is the
    /// version the run's recorded ref names when it holds the init adapter's content, else the oldest version (of any
    /// name) with that content, else none.
    /// </summary>
    void AddLineage(SqliteTransaction tx, string name, int version, RunLineage.Recorded run)
    {
        string? parentName = null;
        int? parentVersion = null;
        if (run.InitSha256 is { } initSha)
        {
            RegistryRef? recorded = null;
            try { if (run.InitRef is { } text) recorded = RegistryRef.Parse(text); }
            catch (LoraKitException) { } // a ref from another tool's hand: the sha lookup below still finds the parent
            if (recorded is { Version: { } rv } && Scalar<string>(tx, "SELECT sha256 FROM versions WHERE name=$n AND version=$v", ("$n", recorded.Name), ("$v", rv)) == initSha)
                (parentName, parentVersion) = (recorded.Name, rv);
            else
            {
                using var cmd = Command(tx, "SELECT name, version FROM versions WHERE sha256=$s ORDER BY created, name, version LIMIT 1", ("$s", initSha));
                using var rd = cmd.ExecuteReader();
                if (rd.Read()) (parentName, parentVersion) = (rd.GetString(0), rd.GetInt32(1));
            }
        }
        Exec(_db, tx, """
            INSERT OR IGNORE INTO lineage(name, version, run_dir, adapter_in_run, run_config, data, metrics, wall_seconds,
                init_adapter_sha256, init_adapter_ref, parent_name, parent_version, added)
            VALUES ($n,$v,$run,$air,$cfg,$data,$m,$wall,$isha,$iref,$pn,$pv,$at)
            """,
            ("$n", name), ("$v", version), ("$run", run.RunDir), ("$air", run.AdapterInRun), ("$cfg", run.RunConfig.ToJsonString()),
            ("$data", run.Data.ToJsonString()), ("$m", run.Metrics.ToJsonString()), ("$wall", run.WallSeconds), ("$isha", run.InitSha256),
            ("$iref", run.InitRef), ("$pn", parentName), ("$pv", parentVersion), ("$at", Now()));
    }

    List<Lineage> LineageOf(string name, int? version)
    {
        var list = new List<Lineage>();
        using var cmd = Command(null, """
            SELECT name, version, run_dir, adapter_in_run, run_config, data, metrics, wall_seconds, init_adapter_sha256,
                   init_adapter_ref, parent_name, parent_version, added
            FROM lineage WHERE name=$n AND ($v IS NULL OR version=$v) ORDER BY version
            """, ("$n", name), ("$v", version));
        using var rd = cmd.ExecuteReader();
        while (rd.Read())
            list.Add(new(rd.GetString(0), rd.GetInt32(1), rd.GetString(2), rd.GetString(3), JsonObj(rd.GetString(4)), JsonObj(rd.GetString(5)),
                JsonObj(rd.GetString(6)), rd.IsDBNull(7) ? null : rd.GetDouble(7), Opt(rd, 8), Opt(rd, 9), Opt(rd, 10),
                rd.IsDBNull(11) ? null : rd.GetInt32(11), rd.GetString(12)));
        return list;
    }

    static JsonObject JsonObj(string text) => JsonNode.Parse(text) as JsonObject ?? new JsonObject();

    /// <summary>
    /// A version's attached evaluations for a diff: how many, whether one passed the gate, and the newest report's scores
    /// for this adapter (its entry with this sha256); a report whose blob is gone says so instead of its scores.
    /// </summary>
    JsonObject EvalSummary(AdapterVersion v)
    {
        var evals = Evals(v.Name, v.Version);
        var o = new JsonObject { ["count"] = evals.Count, ["gate_passed"] = evals.Any(e => e.GatePassed) };
        if (evals.Count == 0) return o;
        var latest = evals[^1];
        o["latest"] = latest.Blob[..12];
        try
        {
            var report = JsonNode.Parse(File.ReadAllText(_blobs.PathOf(latest.Blob))) as JsonObject;
            var entry = (report?["adapters"] as JsonArray ?? []).OfType<JsonObject>().LastOrDefault(a => a["sha256"] is JsonValue s && s.TryGetValue<string>(out var t) && t == v.Sha256);
            if (entry?["scores"] is JsonObject scores) o["scores"] = scores.DeepClone();
            if (report?["base"]?["scores"] is JsonObject baseScores) o["base_scores"] = baseScores.DeepClone();
        }
        catch (Exception e) when (e is IOException or System.Text.Json.JsonException) { o["scores"] = $"(report {latest.Blob[..12]} unreadable: the registry is damaged)"; }
        return o;
    }
}
