using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using LoraKit.Registry;
using LoraKit.Training;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit runs list</c>, <c>lorakit runs show RUN</c> and <c>lorakit runs compare RUN RUN...</c>: a shell over the
/// registry's run records (<see cref="RunLog"/>, written by every <c>lorakit train</c>) and over
/// <see cref="RunSummary"/>, <see cref="RunComparison"/> and <see cref="RunComparisonReport"/>, which read run
/// directories. RUN is a run directory (an existing directory always wins), else a run id or name from the registry of
/// <c>--registry</c>, else <c>LORAKIT_REGISTRY</c>, else ~/.lorakit/registry (looked up only when it exists).
/// </summary>
public static class RunsCommand
{
    public static Command Build()
    {
        var cmd = new Command("runs", "List, show and compare training runs (recorded in the registry by `lorakit train`, or their run directories).");
        cmd.Subcommands.Add(List());
        cmd.Subcommands.Add(Show());
        cmd.Subcommands.Add(Compare());
        return cmd;
    }

    static Option<string?> RegistryOption() =>
        new("--registry") { Description = $"registry to look runs up in (default: ${AdapterStore.EnvVar}, else ~/.lorakit/registry)" };

    static Command List()
    {
        var registry = RegistryOption();
        var json = new Option<bool>("--json") { Description = "print one JSON object instead of a table" };
        var limit = new Option<int>("--limit") { Description = "show the newest N runs (0 = all)", DefaultValueFactory = _ => 20 };
        var cmd = new Command("list", "List recorded training runs, newest first: id, name, status, start, wall time, steps, losses, tokens/s, cost.");
        cmd.Options.Add(registry);
        cmd.Options.Add(json);
        cmd.Options.Add(limit);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            if (r.GetValue(limit) < 0) throw new LoraKitException("--limit must be ≥ 0");
            string root = Path.GetFullPath(r.GetValue(registry) ?? AdapterStore.DefaultPath());
            using var log = RunLog.OpenExisting(root);
            var runs = log?.List(r.GetValue(limit) is > 0 and var n ? n : null) ?? [];
            if (r.GetValue(json))
                Console.WriteLine(new JsonObject { ["registry"] = root, ["runs"] = new JsonArray(runs.Select(x => (JsonNode)x.ToJson()).ToArray()) }.ToJsonString());
            else Console.Write(runs.Count == 0 ? $"no runs recorded in {root}\n" : ListTable(runs));
            return 0;
        }));
        return cmd;
    }

    static Command Show()
    {
        var dir = new Argument<string>("RUN") { Description = "a run directory written by `lorakit train`, or a run id or name from the registry" };
        var json = new Option<bool>("--json") { Description = "print one JSON object instead of text for people" };
        var registry = RegistryOption();
        var cmd = new Command("show", "Summarize a training run: config, base, steps, wall time, device, tokens/s, peak memory, cost, final and best metrics.");
        cmd.Arguments.Add(dir);
        cmd.Options.Add(json);
        cmd.Options.Add(registry);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var (path, record) = Resolve(r.GetValue(dir)!, r.GetValue(registry));
            var run = RunSummary.Load(path);
            if (r.GetValue(json))
            {
                var o = run.ToJson();
                if (record is not null) { o["run_id"] = record.Id; o["status"] = record.Status; o["resumes"] = record.Resumes; }
                Console.WriteLine(o.ToJsonString());
            }
            else Console.Write((record is null ? "" : $"id: {record.Id}, status: {record.Status}{(record.Resumes > 0 ? $", resumed {record.Resumes}×" : "")}\n") + Describe(run));
            return 0;
        }));
        return cmd;
    }

    /// <summary>
    /// The run directory <paramref name="value"/> stands for, and its registry record when there is one. An existing
    /// path is used as it is (a file then fails in <see cref="RunSummary.Load"/> with its own message); anything else is
    /// an id or name in the registry, when one exists.
    /// </summary>
    static (string Dir, RunRecord? Record) Resolve(string value, string? registry)
    {
        if (Directory.Exists(value) || File.Exists(value)) return (value, Recorded(value, registry));
        using var log = RunLog.OpenExisting(registry);
        if (log is null) return (value, null); // RunSummary.Load says there is no such run directory
        var record = log.Resolve(value);
        if (!Directory.Exists(record.OutputDir))
            throw new LoraKitException($"run {record.Id} ({record.Name}) was recorded in {record.OutputDir}, which no longer exists");
        return (record.OutputDir, record);
    }

    /// <summary>The registry's record of the run in <paramref name="dir"/>, if a readable registry has one (a status is a bonus, never an error).</summary>
    static RunRecord? Recorded(string dir, string? registry)
    {
        try { using var log = RunLog.OpenExisting(registry); return log?.ForDirectory(dir); }
        catch (Exception e) when (e is LoraKitException or Microsoft.Data.Sqlite.SqliteException or IOException or UnauthorizedAccessException) { return null; }
    }

    static Command Compare()
    {
        var dirs = new Argument<string[]>("RUN") { Description = "two or more run directories, run ids or run names", Arity = ArgumentArity.OneOrMore };
        var output = new Option<string?>("--output") { Description = "directory for compare.html (plots embedded), the plots and compare.json" };
        var json = new Option<bool>("--json") { Description = "print one JSON object instead of text for people" };
        var registry = RegistryOption();
        var cmd = new Command("compare", "Compare training runs: the config and metrics that differ; with --output, an HTML report with the curves overlaid.");
        cmd.Arguments.Add(dirs);
        cmd.Options.Add(output);
        cmd.Options.Add(json);
        cmd.Options.Add(registry);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var cmp = RunComparison.Load(r.GetValue(dirs)!.Select(d => Resolve(d, r.GetValue(registry)).Dir).ToList());
            string? html = r.GetValue(output) is string outDir ? RunComparisonReport.Write(cmp, outDir) : null;
            if (r.GetValue(json))
            {
                var o = cmp.ToJson();
                o["report"] = html;
                Console.WriteLine(o.ToJsonString());
            }
            else Console.Write(Table(cmp) + (html is null ? "" : $"report: {html}\n"));
            return 0;
        }));
        return cmd;
    }

    static string Describe(RunSummary r)
    {
        var s = new StringBuilder();
        s.AppendLine($"run: {r.Name} ({r.Directory}){(r.Finished ? "" : " — no report.json: the run did not finish")}");
        s.AppendLine($"base model: {r.BaseModel ?? "—"}");
        if (r.Device is not null) s.AppendLine($"device: {r.Device}{(r.DeviceName is null ? "" : $" ({r.DeviceName})")}, {r.DType}; started {r.Started}, ended {r.Ended}");
        if (r.Cost is double cost) s.AppendLine($"cost: {cost.ToString("0.######", CultureInfo.InvariantCulture)} (wall hours × gpu_hour_cost {r.Config["gpu_hour_cost"]?.ToJsonString()})");
        if (r.Data is { } d) s.AppendLine($"data: {d["path"]} ({d["samples"]} samples, {d["tokens"]} tokens){(d["sha256"] is { } h ? $" sha256 {h}" : "")}");
        s.AppendLine($"steps: {r.Steps}, wall: {F(r.WallSeconds)} s, tokens: {r.Tokens?.ToString(CultureInfo.InvariantCulture) ?? "—"}, tokens/s: {F(r.TokensPerSecond)}"
                     + (r.PeakMemoryGib is double m ? $", peak memory: {F(m)} GiB{(r.PeakMemoryKind == "process_peak_working_set" ? " (process peak working set)" : "")}" : ""));
        foreach (var (k, v) in r.Final) s.AppendLine($"final {k}: {F(v)}");
        if (r.BestStep is int b) foreach (var (k, v) in r.Best) s.AppendLine($"best {k}: {F(v)} (step {b})");
        s.AppendLine("config:");
        foreach (var (k, v) in r.Config) s.AppendLine($"  {k}: {v?.ToJsonString() ?? "null"}");
        return s.ToString();
    }

    /// <summary>Recorded runs as a plain-text table, one row per run.</summary>
    static string ListTable(IReadOnlyList<RunRecord> runs)
    {
        var rows = new List<string[]> { new[] { "id", "name", "status", "started", "wall s", "steps", "final loss", "best eval", "tokens/s", "cost" } };
        foreach (var x in runs)
        {
            string best = x.Best is null ? "—" : x.Best.TryGetValue("eval_loss", out var bl) ? $"loss {F(bl)}"
                : x.Best.FirstOrDefault() is { Key: not null } kv ? $"{kv.Key} {F(kv.Value)}" : "—";
            rows.Add([x.Id.ToString(CultureInfo.InvariantCulture), x.Name, x.Status, x.Started.Replace('T', ' ').TrimEnd('Z').Split('.')[0],
                x.WallSeconds is double w ? w.ToString("0.#", CultureInfo.InvariantCulture) : "—", x.Steps?.ToString(CultureInfo.InvariantCulture) ?? "—",
                x.Final?.TryGetValue("train_loss", out var fl) == true ? F(fl) : "—", best,
                x.TokensPerSecond is double t ? t.ToString("0", CultureInfo.InvariantCulture) : "—",
                x.Cost is double c ? c.ToString("0.####", CultureInfo.InvariantCulture) : "—"]);
        }
        var widths = Enumerable.Range(0, rows[0].Length).Select(c => rows.Max(row => row[c].Length)).ToArray();
        var s = new StringBuilder();
        foreach (var row in rows) s.AppendLine(string.Join("  ", row.Select((v, c) => v.PadRight(widths[c]))).TrimEnd());
        return s.ToString();
    }

    /// <summary>The differing config and metrics as a plain-text table, one column per run.</summary>
    static string Table(RunComparison cmp)
    {
        var rows = new List<string?[]>();
        rows.Add([null, .. cmp.Runs.Select(r => r.Name)]);
        void Section(string title, IReadOnlyList<ComparisonRow> section)
        {
            rows.Add([title == "" ? null : title, .. cmp.Runs.Select(_ => (string?)null)]);
            if (section.Count == 0) rows.Add(["  (none differ)", .. cmp.Runs.Select(_ => (string?)null)]);
            foreach (var row in section) rows.Add(["  " + row.Key, .. row.Values.Select(Short)]);
        }
        Section("config", cmp.Config);
        Section("metrics", cmp.Metrics);
        var widths = Enumerable.Range(0, rows[0].Length).Select(c => rows.Max(row => (row[c] ?? "").Length)).ToArray();
        var s = new StringBuilder();
        foreach (var row in rows) s.AppendLine(string.Join("  ", row.Select((v, c) => (v ?? (c == 0 || row.Skip(1).All(x => x is null) ? "" : "—")).PadRight(widths[c]))).TrimEnd());
        return s.ToString();
    }

    /// <summary>Numbers to 4 significant digits for reading (the JSON keeps them whole).</summary>
    static string? Short(string? v) =>
        v is not null && double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var x) && v.Contains('.') ? x.ToString("G4", CultureInfo.InvariantCulture) : v;

    static string F(double? x) => x?.ToString("G5", CultureInfo.InvariantCulture) ?? "—";
}
