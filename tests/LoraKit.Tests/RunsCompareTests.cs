using System.Text.Json.Nodes;
using LoraKit.Lora;
using LoraKit.Training;

namespace LoraKit.Tests;

/// <summary>
/// Issue 19, experiment tracking over run directories: <c>runs show</c> and <c>runs compare</c> on two real tiny runs
/// (the llama fixture, different learning rates, validation and suite metrics), and the errors for what is not a run.
/// </summary>
[Collection(GlobalRng.Name)]
public class RunsCompareTests
{
    /// <summary>Suite metrics from the adapter's B norm n (rises as it trains): enough for the metrics.jsonl <c>suite:</c> records.</summary>
    sealed class BNormEvaluator : IStepEvaluator
    {
        public IReadOnlyDictionary<string, double> Evaluate(LoraModel model, string? adapterName, int step)
        {
            double n = Math.Sqrt(model.Parameters(adapterName!).Where(p => p.key.Contains("lora_B")).Sum(p => p.param.square().sum().item<float>()));
            return new Dictionary<string, double> { ["suite:task"] = n / (1 + n), ["suite:perplexity"] = 1 + n };
        }
    }

    sealed record Run(string Dir, TrainConfig Config, TrainResult Result);

    /// <summary>Two runs made once for the class: lr 1e-2 and 5e-2, everything else equal.</summary>
    static readonly Lazy<(Run a, Run b)> Runs = new(() => (Make("lr-small", 1e-2), Make("lr-large", 5e-2)));

    static readonly string SuitePath = Path.Combine(Fixtures.TempDir(), "suite.jsonl"); // one path: the runs' configs differ only in lr

    static Run Make(string name, double lr)
    {
        var c = TrainingRunTests.Small(Path.Combine(Fixtures.TempDir(), name));
        c.Lr = lr; c.Steps = 6; c.EvalEvery = 2; c.ValidationFraction = 0.34;
        c.EvalSuite = [SuitePath]; // the trainer hands paths to the evaluator; it reads none
        var r = Trainer.Run(c, false, new ListLog(), suites: new BNormEvaluator());
        return new(c.Output, c, r);
    }

    static List<JsonObject> Records(string dir) =>
        File.ReadLines(Path.Combine(dir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();

    [Fact]
    public void ShowReadsTheRunBackFromItsFiles()
    {
        var (a, _) = Runs.Value;
        var s = RunSummary.Load(a.Dir);
        Assert.Equal("lr-small", s.Name);
        Assert.True(s.Finished);
        Assert.Equal(a.Config.Model, s.BaseModel);
        Assert.Equal(a.Result.Steps, s.Steps);
        Assert.Equal(Math.Round(a.Result.WallSeconds, 2), s.WallSeconds);
        var steps = Records(a.Dir).Where(o => o.ContainsKey("loss")).ToList();
        Assert.Equal(steps.Select(o => (int)o["step"]!), s.TrainLoss.Select(p => p.Step));
        Assert.Equal(a.Result.FinalLoss, s.Final["train_loss"], 12);
        Assert.Equal((long)steps[^1]["tokens"]!, s.Tokens);
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(a.Dir, "report.json")))!;
        Assert.Equal((double)report["tokens_per_s"]!, s.TokensPerSecond); // the training loop's throughput, as the trainer measured it
        Assert.Equal((string)report["started"]!, s.Started);
        Assert.Equal("cpu", s.Device);
        Assert.Equal("fp32", s.DType);
        Assert.Equal("process_peak_working_set", s.PeakMemoryKind);
        Assert.Equal((double)report["peak_memory_gib"]!, s.PeakMemoryGib);
        Assert.Null(s.Cost); // no gpu_hour_cost given
        Assert.Equal(a.Result.LastEval!.Loss, s.Final["eval_loss"], 12);
        Assert.Equal(a.Result.LastEval.Suites!["suite:task"], s.Final["suite:task"], 12);
        Assert.Equal(a.Result.Best!.Step, s.BestStep);
        Assert.Equal(a.Result.Best.Loss, s.Best["eval_loss"], 12);
        Assert.Equal([0, 2, 4, 6], s.Evals["suite:task"].Select(p => p.Step)); // step 0: before training
        Assert.Equal(a.Result.Data.Path, (string)s.Data!["path"]!);
        Assert.Equal(a.Config.Lr, (double)s.ToJson()["config"]!["lr"]!);

        var (code, stdout, stderr) = CliTests.RunCli("runs", "show", a.Dir, "--json");
        Assert.True(code == 0, stderr);
        var o = JsonNode.Parse(stdout)!;
        Assert.Equal(a.Result.Steps, (int)o["steps"]!);
        Assert.Equal(a.Result.Best.Loss, (double)o["best"]!["eval_loss"]!, 12);
        (code, stdout, stderr) = CliTests.RunCli("runs", "show", a.Dir);
        Assert.True(code == 0, stderr);
        Assert.Contains($"steps: {a.Result.Steps}", stdout);
        Assert.Contains("final suite:task:", stdout);
    }

    [Fact]
    public void CompareListsTheLearningRateAndTheMetricsThatDiffer()
    {
        var (a, b) = Runs.Value;
        var cmp = RunComparison.Load([a.Dir, b.Dir]);
        var lr = Assert.Single(cmp.Config);  // the only config key that differs (output is left out)
        Assert.Equal("lr", lr.Key);
        Assert.Equal([a.Config.Lr, b.Config.Lr], lr.Values.Select(v => double.Parse(v!, System.Globalization.CultureInfo.InvariantCulture)));
        var metrics = cmp.Metrics.ToDictionary(m => m.Key);
        foreach (var key in new[] { "final train_loss", "final eval_loss", "final suite:task", "best eval_loss" }) Assert.Contains(key, metrics.Keys);
        Assert.DoesNotContain("steps", metrics.Keys); // both ran 6 steps
        Assert.Equal(a.Result.FinalLoss, double.Parse(metrics["final train_loss"].Values[0]!, System.Globalization.CultureInfo.InvariantCulture), 12);
        Assert.Equal(b.Result.FinalLoss, double.Parse(metrics["final train_loss"].Values[1]!, System.Globalization.CultureInfo.InvariantCulture), 12);

        var (code, stdout, stderr) = CliTests.RunCli("runs", "compare", a.Dir, b.Dir, "--json");
        Assert.True(code == 0, stderr);
        var o = JsonNode.Parse(stdout)!;
        Assert.Equal([a.Config.Lr, b.Config.Lr], o["config_differences"]!["lr"]!.AsArray().Select(v => (double)v!));
        Assert.Equal(b.Result.LastEval!.Loss, (double)o["metric_differences"]!["final eval_loss"]![1]!, 12);
        Assert.Null(o["report"]);
        (code, stdout, stderr) = CliTests.RunCli("runs", "compare", a.Dir, b.Dir);
        Assert.True(code == 0, stderr);
        var lrLine = Assert.Single(stdout.Split('\n'), l => l.TrimStart().StartsWith("lr "));
        Assert.Contains("0.01", lrLine);
        Assert.Contains("0.05", lrLine);
        Assert.Contains("lr-small", stdout.Split('\n')[0]);
        Assert.Contains("lr-large", stdout.Split('\n')[0]);
    }

    [Fact]
    public void CompareWritesASelfContainedHtmlReportWithThePlots()
    {
        var (a, b) = Runs.Value;
        var outDir = Path.Combine(Fixtures.TempDir(), "cmp");
        var (code, stdout, stderr) = CliTests.RunCli("runs", "compare", a.Dir, b.Dir, "--output", outDir, "--json");
        Assert.True(code == 0, stderr);
        var html = (string)JsonNode.Parse(stdout)!["report"]!;
        Assert.Equal(Path.Combine(outDir, RunComparisonReport.HtmlFile), html);
        var text = File.ReadAllText(html);
        // loss + one plot per evaluation metric (eval_loss, eval_ppl, suite:perplexity, suite:task), each embedded.
        var images = System.Text.RegularExpressions.Regex.Matches(text, "src=\"data:image/png;base64,([^\"]+)\"");
        Assert.Equal(5, images.Count);
        foreach (System.Text.RegularExpressions.Match m in images)
        {
            var png = Convert.FromBase64String(m.Groups[1].Value);
            Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }, png[..4]);
            Assert.True(png.Length > 10_000, "a plot with curves, axes and a legend is not a few bytes");
        }
        Assert.Equal(File.ReadAllBytes(Path.Combine(outDir, "loss.png")), Convert.FromBase64String(images[0].Groups[1].Value));
        Assert.True(File.Exists(Path.Combine(outDir, "metric-suite-task.png")));
        Assert.Contains("<th>lr</th>", text);
        Assert.Contains("lr-small", text);
        Assert.DoesNotContain("src=\"http", text); // nothing fetched from elsewhere
        if (Environment.GetEnvironmentVariable("LORAKIT_KEEP_PLOTS") is string keep)
            foreach (var f in Directory.GetFiles(outDir, "*.png")) File.Copy(f, Path.Combine(keep, Path.GetFileName(f)), true);
    }

    [Fact]
    public void BadInputsAreOneLineNamingTheFile()
    {
        var (a, _) = Runs.Value;
        var notRun = Fixtures.TempDir();
        File.WriteAllText(Path.Combine(notRun, "notes.txt"), "x");
        var ex = Assert.Throws<LoraKitException>(() => RunSummary.Load(notRun));
        Assert.Contains("not a LoraKit run directory", ex.Message);
        Assert.Contains("no such run directory", Assert.Throws<LoraKitException>(() => RunSummary.Load(Path.Combine(notRun, "absent"))).Message);
        Assert.Contains("at least two", Assert.Throws<LoraKitException>(() => RunComparison.Load([a.Dir])).Message);

        // A copy of the run with a corrupt metrics line in the middle: the error names file:line.
        var bad = Path.Combine(Fixtures.TempDir(), "bad");
        Directory.CreateDirectory(bad);
        File.Copy(Path.Combine(a.Dir, RunDirectory.ManifestFile), Path.Combine(bad, RunDirectory.ManifestFile));
        var lines = File.ReadAllLines(Path.Combine(a.Dir, "metrics.jsonl")).ToList();
        lines.Insert(2, "{\"step\": 2, \"loss\": 1.0");
        File.WriteAllLines(Path.Combine(bad, "metrics.jsonl"), lines);
        var metrics = Path.Combine(bad, "metrics.jsonl");
        ex = Assert.Throws<LoraKitException>(() => RunSummary.Load(bad));
        Assert.StartsWith($"{metrics}:3:", ex.Message);
        var (code, stdout, stderr) = CliTests.RunCli("runs", "compare", a.Dir, bad);
        Assert.Equal(1, code);
        Assert.Equal($"error: {ex.Message}", stderr.Trim());
        Assert.Equal("", stdout);
        lines[2] = "[1, 2]";
        File.WriteAllLines(metrics, lines);
        Assert.StartsWith($"{metrics}:3:", Assert.Throws<LoraKitException>(() => RunSummary.Load(bad)).Message);

        // A last line cut off by a kill (no newline after it) is left out, as resume does; the run did not finish.
        lines.RemoveAt(2);
        File.WriteAllText(metrics, string.Join("\n", lines) + "\n{\"step\": 7, \"lo");
        var s = RunSummary.Load(bad);
        Assert.False(s.Finished);
        Assert.Equal(RunSummary.Load(a.Dir).TrainLoss, s.TrainLoss);

        (code, _, stderr) = CliTests.RunCli("runs", "compare", a.Dir);
        Assert.Equal(1, code);
        Assert.Equal("error: compare needs at least two run directories", stderr.Trim());
        (code, _, stderr) = CliTests.RunCli("runs", "show", notRun);
        Assert.Equal(1, code);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.Contains("not a LoraKit run directory", stderr);
        File.WriteAllText(Path.Combine(bad, RunDirectory.ManifestFile), "{\"files\": []}");
        Assert.Contains("no \"config\"", Assert.Throws<LoraKitException>(() => RunSummary.Load(bad)).Message);
    }
}
