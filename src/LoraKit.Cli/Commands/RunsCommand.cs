using System.CommandLine;
using System.Globalization;
using System.Text;
using LoraKit.Training;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit runs show RUN_DIR</c> and <c>lorakit runs compare RUN_DIR RUN_DIR...</c>: a shell over
/// <see cref="RunSummary"/>, <see cref="RunComparison"/> and <see cref="RunComparisonReport"/>, reading run directories
/// written by <c>lorakit train</c>.
/// </summary>
public static class RunsCommand
{
    public static Command Build()
    {
        var cmd = new Command("runs", "Show and compare training runs (run directories written by `lorakit train`).");
        cmd.Subcommands.Add(Show());
        cmd.Subcommands.Add(Compare());
        return cmd;
    }

    static Command Show()
    {
        var dir = new Argument<string>("RUN_DIR") { Description = "a run directory written by `lorakit train`" };
        var json = new Option<bool>("--json") { Description = "print one JSON object instead of text for people" };
        var cmd = new Command("show", "Summarize a training run: config, base, steps, wall time, tokens/s, final and best metrics.");
        cmd.Arguments.Add(dir);
        cmd.Options.Add(json);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var run = RunSummary.Load(r.GetValue(dir)!);
            Console.WriteLine(r.GetValue(json) ? run.ToJson().ToJsonString() : Describe(run));
            return 0;
        }));
        return cmd;
    }

    static Command Compare()
    {
        var dirs = new Argument<string[]>("RUN_DIR") { Description = "two or more run directories", Arity = ArgumentArity.OneOrMore };
        var output = new Option<string?>("--output") { Description = "directory for compare.html (plots embedded), the plots and compare.json" };
        var json = new Option<bool>("--json") { Description = "print one JSON object instead of text for people" };
        var cmd = new Command("compare", "Compare training runs: the config and metrics that differ; with --output, an HTML report with the curves overlaid.");
        cmd.Arguments.Add(dirs);
        cmd.Options.Add(output);
        cmd.Options.Add(json);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var cmp = RunComparison.Load(r.GetValue(dirs)!);
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
        if (r.Data is { } d) s.AppendLine($"data: {d["path"]} ({d["samples"]} samples, {d["tokens"]} tokens){(d["sha256"] is { } h ? $" sha256 {h}" : "")}");
        s.AppendLine($"steps: {r.Steps}, wall: {F(r.WallSeconds)} s, tokens: {r.Tokens?.ToString(CultureInfo.InvariantCulture) ?? "—"}, tokens/s: {F(r.TokensPerSecond)}"
                     + (r.PeakMemoryGib is double m ? $", peak memory: {F(m)} GiB" : ""));
        foreach (var (k, v) in r.Final) s.AppendLine($"final {k}: {F(v)}");
        if (r.BestStep is int b) foreach (var (k, v) in r.Best) s.AppendLine($"best {k}: {F(v)} (step {b})");
        s.AppendLine("config:");
        foreach (var (k, v) in r.Config) s.AppendLine($"  {k}: {v?.ToJsonString() ?? "null"}");
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
