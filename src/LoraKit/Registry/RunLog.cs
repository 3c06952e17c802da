using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Training;
using Microsoft.Data.Sqlite;

namespace LoraKit.Registry;

/// <summary>
/// The registry's record of training runs (table <c>runs</c>, <see cref="RunRecord"/>), in the same database as the
/// adapters (<see cref="AdapterStore.Open"/>: WAL, busy timeout, one transaction per write). One row per run directory:
/// a fresh run (or one started again with <c>overwrite</c>) replaces the row of its directory under a new id; a resumed
/// run updates its row (status back to running, <c>resumes</c> + 1, start time kept, wall seconds and cost summed over
/// its processes). <see cref="RunTracker"/> is what <c>lorakit train</c> records through.
/// </summary>
public sealed class RunLog : IDisposable
{
    readonly AdapterStore _store;
    SqliteConnection Db => _store.Connection;

    RunLog(AdapterStore store) { _store = store; }

    /// <summary>The registry folder.</summary>
    public string Root => _store.Root;

    /// <summary>Opens (creating if needed) the registry at <paramref name="path"/>, else <see cref="AdapterStore.DefaultPath"/>.</summary>
    public static RunLog Open(string? path = null) => new(AdapterStore.Open(path));

    /// <summary>The registry at <paramref name="path"/> (else the default) when it exists, else null: a lookup never creates one.</summary>
    public static RunLog? OpenExisting(string? path = null)
    {
        string root = Path.GetFullPath(path ?? AdapterStore.DefaultPath());
        return File.Exists(Path.Combine(root, AdapterStore.DbFile)) ? Open(root) : null;
    }

    /// <summary>Records a run as running; returns its id (a resumed run's existing id).</summary>
    public long Start(RunStart s)
    {
        using var tx = Db.BeginTransaction();
        long? existing = Scalar<long?>(tx, "SELECT id FROM runs WHERE output_dir=$d", ("$d", s.OutputDir));
        string config = s.Config.ToJsonString();
        if (s.Resumed && existing is long id)
        {
            Exec(tx, "UPDATE runs SET status=$st, config=$c, device=$dev, ended=NULL, error=NULL, resumes=resumes+1 WHERE id=$id",
                ("$st", RunEnd.Running), ("$c", config), ("$dev", s.Device), ("$id", id));
        }
        else
        {
            if (existing is long old) Exec(tx, "DELETE FROM runs WHERE id=$id", ("$id", old)); // the directory now holds another run
            Exec(tx, "INSERT INTO runs(output_dir, name, status, config, base_model, base_fingerprint, started, device, resumes) VALUES ($d,$n,$st,$c,$bm,$fp,$s,$dev,$r)",
                ("$d", s.OutputDir), ("$n", s.Name), ("$st", RunEnd.Running), ("$c", config), ("$bm", s.BaseModel), ("$fp", s.BaseFingerprint),
                ("$s", TrainReport.Iso(s.Started)), ("$dev", s.Device), ("$r", s.Resumed ? 1 : 0));
            id = Scalar<long?>(tx, "SELECT last_insert_rowid()") ?? throw new InvalidOperationException("registry: run row vanished after insert");
        }
        tx.Commit();
        return id;
    }

    /// <summary>
    /// Records how run <paramref name="id"/> ended: status, end time, <paramref name="seconds"/> more wall time (and their
    /// cost at the config's <c>gpu_hour_cost</c>), and what <paramref name="summary"/> (its directory, read back) says.
    /// </summary>
    public void End(long id, RunEnd end, double seconds, RunSummary? summary)
    {
        using var tx = Db.BeginTransaction();
        var config = Scalar<string>(tx, "SELECT config FROM runs WHERE id=$id", ("$id", id)) ?? throw new LoraKitException($"registry: no run {id} in {Root}");
        double? rate = JsonNode.Parse(config)?["gpu_hour_cost"] is JsonValue v && v.TryGetValue<double>(out var r) ? r : null;
        // The cost is computed here by the report's own function (RunStats.Cost), not by SQLite's round(), which rounds
        // half away from zero where .NET rounds half to even: the row and report.json would differ in the last digit.
        double wall = (Scalar<double?>(tx, "SELECT wall_seconds FROM runs WHERE id=$id", ("$id", id)) ?? 0) + Math.Round(seconds, 3);
        Exec(tx, "UPDATE runs SET status=$st, ended=$e, error=$err, wall_seconds=$w, cost=$cost WHERE id=$id",
            ("$st", end.Status), ("$e", TrainReport.Iso(end.Ended)), ("$err", end.Error), ("$w", wall), ("$cost", RunStats.Cost(wall, rate)), ("$id", id));
        if (summary is not null)
        {
            var data = new JsonObject { ["data"] = summary.Data?.DeepClone(), ["validation"] = summary.Validation?.DeepClone() };
            Exec(tx, "UPDATE runs SET steps=$s, tokens=$t, tokens_per_s=$tps, peak_memory_gib=$pm, final_metrics=$f, best_metrics=$b, best_step=$bs, data=$d WHERE id=$id",
                ("$s", summary.Steps), ("$t", summary.Tokens), ("$tps", summary.TokensPerSecond is double x ? Math.Round(x, 1) : null), ("$pm", summary.PeakMemoryGib),
                ("$f", Json(summary.Final)), ("$b", summary.BestStep is null ? null : Json(summary.Best)), ("$bs", summary.BestStep),
                ("$d", summary.Data is null && summary.Validation is null ? null : data.ToJsonString()), ("$id", id));
        }
        tx.Commit();
    }

    /// <summary>Runs, newest first; at most <paramref name="limit"/> when given.</summary>
    public IReadOnlyList<RunRecord> List(int? limit = null) =>
        Rows("ORDER BY id DESC" + (limit is int n ? $" LIMIT {Math.Max(0, n)}" : ""));

    /// <summary>The run with this id, or null.</summary>
    public RunRecord? Get(long id) => Rows("WHERE id=$id", ("$id", id)).FirstOrDefault();

    /// <summary>The run recorded for this output directory, or null.</summary>
    public RunRecord? ForDirectory(string dir) => Rows("WHERE output_dir=$d", ("$d", Path.GetFullPath(dir))).FirstOrDefault();

    /// <summary>
    /// The run <paramref name="reference"/> names: an id (a number), else a name (the run directory's name). A name more
    /// than one run has is an error listing their ids; none is an error naming the registry.
    /// </summary>
    public RunRecord Resolve(string reference)
    {
        if (long.TryParse(reference, NumberStyles.None, CultureInfo.InvariantCulture, out long id) && Get(id) is { } byId) return byId;
        var named = Rows("WHERE name=$n ORDER BY id", ("$n", reference));
        return named.Count switch
        {
            1 => named[0],
            0 => throw new LoraKitException($"no run directory '{RegistryRef.Clip(reference)}' and no run with that id or name in the registry at {Root}"),
            _ => throw new LoraKitException($"{named.Count} runs are named '{reference}' (ids {string.Join(", ", named.Select(r => r.Id))}); give the id or the directory"),
        };
    }

    /// <summary>Closes the database.</summary>
    public void Dispose() => _store.Dispose();

    const string Columns = "id, output_dir, name, status, config, base_model, base_fingerprint, started, ended, device, resumes, wall_seconds, steps, tokens, " +
                           "tokens_per_s, peak_memory_gib, final_metrics, best_metrics, best_step, data, cost, error";

    List<RunRecord> Rows(string where, params (string, object?)[] args)
    {
        var rows = new List<RunRecord>();
        using var cmd = Command(null, $"SELECT {Columns} FROM runs {where}", args);
        using var rd = cmd.ExecuteReader();
        while (rd.Read())
            rows.Add(new(rd.GetInt64(0), rd.GetString(1), rd.GetString(2), rd.GetString(3), rd.GetString(4), S(rd, 5), S(rd, 6), rd.GetString(7), S(rd, 8),
                S(rd, 9), rd.GetInt32(10), D(rd, 11), rd.IsDBNull(12) ? null : rd.GetInt32(12), rd.IsDBNull(13) ? null : rd.GetInt64(13), D(rd, 14), D(rd, 15),
                Metrics(S(rd, 16)), Metrics(S(rd, 17)), rd.IsDBNull(18) ? null : rd.GetInt32(18), S(rd, 19) is string d ? JsonNode.Parse(d) as JsonObject : null,
                D(rd, 20), S(rd, 21)));
        return rows;
    }

    static string? S(SqliteDataReader rd, int i) => rd.IsDBNull(i) ? null : rd.GetString(i);
    static double? D(SqliteDataReader rd, int i) => rd.IsDBNull(i) ? null : rd.GetDouble(i);

    static string Json(IReadOnlyDictionary<string, double> d) => JsonSerializer.Serialize(d.Where(kv => double.IsFinite(kv.Value)).ToDictionary());

    static IReadOnlyDictionary<string, double>? Metrics(string? json) => json is null ? null : JsonSerializer.Deserialize<SortedDictionary<string, double>>(json);

    SqliteCommand Command(SqliteTransaction? tx, string sql, params (string, object?)[] args) => _store.Command(tx, sql, args);

    T? Scalar<T>(SqliteTransaction? tx, string sql, params (string, object?)[] args) => _store.Scalar<T>(tx, sql, args);

    void Exec(SqliteTransaction? tx, string sql, params (string, object?)[] args)
    {
        using var cmd = Command(tx, sql, args);
        cmd.ExecuteNonQuery();
    }
}
