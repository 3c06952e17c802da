using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using LoraKit.Cli.Progress;
using LoraKit.Evaluation;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit eval</c>: the base and each adapter on the same suites, side by side, with the promotion gate. Exit codes:
/// 0 passed (or no gate asked), 3 an adapter failed the gate, 1 an error.
/// </summary>
public static class EvalCommand
{
    /// <summary>The exit code of a failed gate (1 stays "an error").</summary>
    public const int GateFailed = 3;

    public static Command Build()
    {
        var common = new CommonOptions();
        var adapters = new Option<string[]>("--adapter") { Description = "PEFT adapter directory to evaluate against the base (repeatable)", AllowMultipleArgumentsPerToken = false };
        var suites = new Option<string[]>("--suite") { Description = "suite file (JSONL), or a built-in suite: lorakit:capability, lorakit:safety (repeatable)", Required = true };
        var output = new Option<string?>("--output") { Description = "directory for eval.json and eval.html" };
        var gate = new Option<bool>("--gate") { Description = "exit 3 when an adapter fails the gate" };
        var capDrop = new Option<double>("--max-capability-drop") { Description = "gate: largest allowed drop of the capability pass rate, in points", DefaultValueFactory = _ => 2 };
        var pplUp = new Option<double>("--max-perplexity-increase") { Description = "gate: largest allowed rise of perplexity, in percent", DefaultValueFactory = _ => 5 };
        var minTask = new Option<double?>("--min-task-score") { Description = "gate: lowest allowed task pass rate, in percent" };
        var safety = new Option<int>("--max-safety-regressions") { Description = "gate: safety cases allowed to regress", DefaultValueFactory = _ => 0 };
        var batch = new Option<int>("--batch-size") { Description = "cases generated together", DefaultValueFactory = _ => 32 };
        var judgeUrl = new Option<string?>("--judge-url") { Description = $"OpenAI-compatible endpoint (base URL, e.g. http://host:8000/v1) of an LLM judge for rubric cases; key from {RubricJudge.ApiKeyVariable}" };
        var registry = AdapterArgument.RegistryOption();
        var judgeModel = new Option<string?>("--judge-model") { Description = "the judge's model name at --judge-url" };
        var cmd = new Command("eval", "Evaluate the base model and adapters on task, capability and safety suites; gate adapters that regress.");
        cmd.Options.Add(common.Model);
        cmd.Options.Add(common.Device);
        cmd.Options.Add(common.DType);
        cmd.Options.Add(common.Json);
        common.Quantize.AddTo(cmd);
        foreach (var o in new Option[] { adapters, suites, output, gate, capDrop, pplUp, minTask, safety, batch, judgeUrl, judgeModel, registry }) cmd.Options.Add(o);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var thresholds = new GateThresholds
            {
                MaxCapabilityDrop = r.GetValue(capDrop), MaxPerplexityIncrease = r.GetValue(pplUp),
                MinTaskScore = r.GetValue(minTask), MaxSafetyRegressions = r.GetValue(safety),
            };
            thresholds.Validate();
            if (r.GetValue(batch) < 1) throw new LoraKitException("--batch-size must be at least 1");
            var outDir = r.GetValue(output);
            if (outDir is not null) EnsureReportDirectory(outDir);
            var loaded = r.GetValue(suites)!.Select(EvalSuite.Load).ToList(); // suite errors before minutes of loading
            var resolved = (r.GetValue(adapters) ?? []).Select(a => AdapterArgument.ResolveVersion(a, r.GetValue(registry))).ToList();
            var adapterDirs = resolved.Select(x => x.Dir).ToList();
            if ((r.GetValue(judgeUrl) is null) != (r.GetValue(judgeModel) is null)) throw new LoraKitException("give --judge-url and --judge-model together");
            using var judge = r.GetValue(judgeUrl) is string url
                ? RubricJudge.ForEndpoint(url, r.GetValue(judgeModel)!, Environment.GetEnvironmentVariable(RubricJudge.ApiKeyVariable)) : null;
            bool json = r.GetValue(common.Json);
            var quantize = common.Quantize.Resolve(r);
            var modelDir = common.ModelDir(r);
            IO.ModelDirectory.Require(modelDir);
            using var model = LoraKitModel.FromPretrained(modelDir, r.GetValue(common.Device)!, r.GetValue(common.DType), quantize);
            // a bar on a terminal, plain lines on a redirected stderr, nothing under --json (stdout is the report)
            var report = CliProgress.Run("eval", progress => model.Evaluate(loaded, adapterDirs, new EvalOptions
            {
                Gate = thresholds, GateEnforced = r.GetValue(gate), MaxBatch = r.GetValue(batch), Progress = progress.AsCallback(), Judge = judge?.AsJudgeFunc(),
                Settings = new JsonObject
                {
                    ["device"] = model.Device.type.ToString().ToLowerInvariant(), ["dtype"] = model.Model.DType.ToString(),
                    ["judge"] = judge is null ? null : new JsonObject { ["url"] = r.GetValue(judgeUrl), ["model"] = r.GetValue(judgeModel) },
                },
            }), unit: "cases", mode: json ? ProgressMode.Off : ProgressMode.Auto);
            // An adapter given by name is recorded as the version it resolved to (the entries are in the order given).
            report = report with
            {
                Adapters = report.Adapters.Select((a, i) => resolved[i].Version is { } v ? a with { Registered = new(v.Name, v.Version, v.Sha256) } : a).ToList(),
            };
            if (outDir is not null) report.Write(outDir);
            if (json) Console.WriteLine(report.ToJson().ToJsonString());
            else Print(report, outDir);
            return r.GetValue(gate) && !report.AllPassed ? GateFailed : 0;
        }));
        return cmd;
    }

    /// <summary>The report goes into a new or empty directory, or one holding only an earlier report (which it replaces).</summary>
    static void EnsureReportDirectory(string dir)
    {
        if (File.Exists(dir)) throw new LoraKitException($"--output {dir} is a file; give a directory for eval.json and eval.html");
        if (!Directory.Exists(dir))
        {
            // A dangling link cannot be created as a directory; say so now rather than after the whole evaluation.
            if (new FileInfo(dir).LinkTarget is string target) throw new LoraKitException($"--output {dir} is a link to '{target}', which does not exist");
            return;
        }
        var foreign = Directory.EnumerateFileSystemEntries(dir).Select(Path.GetFileName)
            .Where(n => n is not (EvalReport.JsonFile or EvalReport.HtmlFile)).Take(3).ToList();
        if (foreign.Count > 0)
            throw new LoraKitException($"--output {dir} holds other files ({string.Join(", ", foreign)}); give a new or empty directory (LoraKit only replaces its own eval.json and eval.html)");
        // Checked now: a directory in the report's place would only fail the write after the whole evaluation.
        foreach (var name in new[] { EvalReport.JsonFile, EvalReport.HtmlFile })
            if (Directory.Exists(Path.Combine(dir, name)))
                throw new LoraKitException($"--output {dir}: {name} there is a directory; give a new or empty directory");
    }

    static void Print(EvalReport report, string? outDir)
    {
        string Rate(Scores s, CaseKind k) => s.Kinds[k] is { Total: > 0 } ks ? $"{ks.PassRate * 100,5:0.#}% ({ks.Passed}/{ks.Total})" : "    –";
        string Ppl(Scores s) => s.Perplexity is double p ? p.ToString("0.###", CultureInfo.InvariantCulture) : "–";
        Console.WriteLine($"{"model",-40} {"task",-16} {"capability",-16} {"safety",-16} perplexity");
        void Line(string name, Scores s) =>
            Console.WriteLine($"{Trim(name),-40} {Rate(s, CaseKind.Task),-16} {Rate(s, CaseKind.Capability),-16} {Rate(s, CaseKind.Safety),-16} {Ppl(s)}");
        Line("base", report.BaseScores);
        foreach (var a in report.Adapters) Line(a.Registered?.Ref ?? a.Adapter, a.Scores);
        foreach (var a in report.Adapters)
        {
            Console.WriteLine();
            Console.WriteLine($"{a.Registered?.Ref ?? a.Adapter} (sha256 {a.Sha256[..12]}): gate {(a.Gate.Passed ? "passed" : "FAILED")}");
            foreach (var reason in a.Gate.Reasons) Console.WriteLine($"  - {reason}");
            if (a.Comparison.Regressions.Count > 0) Console.WriteLine($"  regressed ({a.Comparison.Regressions.Count}): {Ids(a.Comparison.Regressions)}");
            if (a.Comparison.Improvements.Count > 0) Console.WriteLine($"  improved ({a.Comparison.Improvements.Count}):  {Ids(a.Comparison.Improvements)}");
        }
        if (outDir is not null) Console.WriteLine($"\nreport: {Path.Combine(outDir, EvalReport.JsonFile)}, {Path.Combine(outDir, EvalReport.HtmlFile)}");
    }

    /// <summary>The first 20 case names; every one is in the report (--json, --output).</summary>
    static string Ids(IReadOnlyList<CaseResult> cases) =>
        string.Join(", ", cases.Take(20).Select(x => x.Key)) + (cases.Count > 20 ? $", … {cases.Count - 20} more (all in the report: --json or --output)" : "");

    static string Trim(string s) => s.Length <= 40 ? s : "…" + s[^39..];
}
