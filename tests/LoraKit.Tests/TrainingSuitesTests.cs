using System.Text.Json.Nodes;
using LoraKit.Lora;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// Issue 18, during training: <c>train --eval-suite</c>. The trainer runs an <see cref="IStepEvaluator"/> at step 0 and at
/// every evaluation, logs its metrics, draws them, resumes without redoing step 0, and can follow a suite metric in
/// either direction for best/ and early stopping. The evaluator here measures the adapter itself (the norm of its
/// lora_B weights, zero before the first update and growing as it trains), so every value is the model's own.
/// </summary>
[Collection(GlobalRng.Name)]
public class TrainingSuitesTests
{
    /// <summary>
    /// Metrics from the adapter's B norm n: suite:task n/(1+n) rises as it trains, suite:capability 1/(1+n) falls,
    /// suite:perplexity is 1+n (rising) or 1+1/(1+n) (falling). Records each call and the state it was called in.
    /// </summary>
    sealed class BNormEvaluator(bool perplexityFalls = false) : IStepEvaluator
    {
        public List<(int step, string? adapter, bool training, bool grad, IReadOnlyDictionary<string, double> result)> Calls { get; } = [];

        public IReadOnlyDictionary<string, double> Evaluate(LoraModel model, string? adapterName, int step)
        {
            double sq = adapterName is null
                ? model.Model.named_parameters().Where(p => p.name.EndsWith("q_proj.weight")).Sum(p => p.parameter.square().sum().item<float>())
                : model.Parameters(adapterName).Where(p => p.key.Contains("lora_B")).Sum(p => p.param.square().sum().item<float>());
            double n = Math.Sqrt(sq);
            var result = new Dictionary<string, double>
            {
                ["suite:task"] = n / (1 + n), ["suite:capability"] = 1 / (1 + n), ["suite:perplexity"] = perplexityFalls ? 1 + 1 / (1 + n) : 1 + n,
            };
            Calls.Add((step, adapterName, model.Model.training, is_grad_enabled(), result));
            return result;
        }
    }

    static TrainConfig Small(string? output = null)
    {
        var c = TrainingRunTests.Small(output);
        c.EvalSuite = [Path.Combine(Fixtures.TempDir(), "suite.jsonl")]; // the trainer hands paths to the evaluator; it reads none
        return c;
    }

    static List<JsonObject> Records(string output) =>
        File.ReadLines(Path.Combine(output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();

    [Fact]
    public void RunsAtStepZeroAndEveryEvaluationAndLogsTheMetrics()
    {
        var c = Small();
        c.Steps = 6; c.EvalEvery = 2; c.ValidationFraction = 0.34;
        var suites = new BNormEvaluator();
        var log = new ListLog();
        var r = Trainer.Run(c, false, log, suites: suites);

        Assert.Equal([0, 2, 4, 6], suites.Calls.Select(x => x.step));
        Assert.All(suites.Calls, x => Assert.Equal((Trainer.AdapterName, false, false), (x.adapter, x.training, x.grad)));
        Assert.Equal(0, suites.Calls[0].result["suite:task"]); // before any update: B is zero, this is the base
        Assert.True(suites.Calls[^1].result["suite:task"] > 0);

        var evals = Records(c.Output).Where(o => o.ContainsKey("is_best")).ToList();
        Assert.Equal([0, 2, 4, 6], evals.Select(o => o["step"]!.GetValue<int>()));
        // Step 0 has the suites only (no validation pass of the base) and is no candidate for best/.
        Assert.False(evals[0].ContainsKey("eval_loss"));
        Assert.False(evals[0]["is_best"]!.GetValue<bool>());
        Assert.All(evals.Skip(1), o => Assert.NotNull(o["eval_loss"]));
        foreach (var (o, call) in evals.Zip(suites.Calls))
            foreach (var (name, value) in call.result) Assert.Equal(value, o[name]!.GetValue<double>());
        Assert.Equal(["step", "suite:task", "suite:capability", "suite:perplexity", "is_best"], evals[0].Select(kv => kv.Key));

        // The console log and the result carry them too; the best is still by eval_loss (the default metric).
        Assert.Equal([0, 2, 4, 6], log.Evals.Select(e => e.Step));
        Assert.Equal(suites.Calls[^1].result, r.LastEval!.Suites);
        Assert.Equal(evals.Skip(1).MinBy(o => o["eval_loss"]!.GetValue<double>())!["step"]!.GetValue<int>(), r.Best!.Step);
    }

    [Fact]
    public void ReportDrawsTheSuiteCurves()
    {
        var c = Small();
        c.Steps = 4; c.EvalEvery = 2;
        var suites = new BNormEvaluator();
        Trainer.Run(c, false, new ListLog(), suites: suites);

        var png = Path.Combine(c.Output, TrainReport.SuitesPlot);
        Assert.True(new FileInfo(png).Length > 1000);
        var html = File.ReadAllText(Path.Combine(c.Output, "report.html"));
        Assert.Contains("<h2>Evaluation suites</h2>", html);
        Assert.Contains(Convert.ToBase64String(File.ReadAllBytes(png)), html);
        Assert.Contains("<th>suite:capability</th>", html);
        Assert.Contains($"<td>{TrainReport.Format("suite:task", suites.Calls[^1].result["suite:task"])}</td>", html);
        Assert.Contains("<tr><td>0</td><td>0.0%</td><td>100.0%</td><td>1.00</td></tr>", html); // step 0: B = 0

        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(c.Output, "report.json")))!;
        var task = report["suites"]!["suite:task"]!.AsArray();
        Assert.Equal([0, 2, 4], task.Select(p => p!["step"]!.GetValue<int>()));
        Assert.Equal(suites.Calls.Select(x => x.result["suite:task"]), task.Select(p => p!["value"]!.GetValue<double>()));
        Assert.NotNull(report["last_eval"]!["suites"]);

        // A run without suites writes neither the plot nor the section, and its report has no suites key.
        var plain = TrainingRunTests.Small();
        Trainer.Run(plain, false, new ListLog());
        Assert.False(File.Exists(Path.Combine(plain.Output, TrainReport.SuitesPlot)));
        Assert.DoesNotContain("Evaluation suites", File.ReadAllText(Path.Combine(plain.Output, "report.html")));
        Assert.Null(JsonNode.Parse(File.ReadAllText(Path.Combine(plain.Output, "report.json")))!["suites"]);
    }

    /// <summary>
    /// Runs with <paramref name="metric"/> as the one to follow, evaluating every step with patience 2, and checks the
    /// outcome against the logged values: best = the best logged value in the metric's direction (step 0 excluded),
    /// stopped early exactly when two evaluations in a row did not beat it.
    /// </summary>
    static (TrainResult r, ListLog log, List<(int step, double value)> series) FollowMetric(string metric, bool perplexityFalls)
    {
        var c = Small();
        c.Steps = 8; c.EvalEvery = 1; c.EarlyStoppingPatience = 2; c.Metric = metric;
        var log = new ListLog();
        var r = Trainer.Run(c, false, log, suites: new BNormEvaluator(perplexityFalls));
        var series = Records(c.Output).Where(o => o.ContainsKey(metric) && o["step"]!.GetValue<int>() > 0)
            .Select(o => (o["step"]!.GetValue<int>(), o[metric]!.GetValue<double>())).ToList();
        bool lower = TrainConfig.LowerIsBetter(metric);
        var best = lower ? series.MinBy(p => p.Item2) : series.MaxBy(p => p.Item2);
        Assert.Equal(best.Item1, r.Best!.Step);
        Assert.Equal(series.Count(p => p.Item1 > best.Item1) >= 2, r.StoppedEarly);
        Assert.Equal(File.ReadAllBytes(Path.Combine(c.Output, "best", "adapter_model.safetensors")), File.ReadAllBytes(Path.Combine(r.AdapterDir, "adapter_model.safetensors")));
        return (r, log, series);
    }

    [Theory]
    [InlineData("suite:task", false, false)]       // higher is better, rising: every step is the best
    [InlineData("suite:capability", false, true)]  // higher is better, falling: the first evaluation is the best
    [InlineData("suite:perplexity", false, true)]  // lower is better, rising: the first evaluation is the best
    [InlineData("suite:perplexity", true, false)]  // lower is better, falling: every step is the best
    public void EarlyStoppingAndBestFollowTheSuiteMetricsDirection(string metric, bool perplexityFalls, bool stops)
    {
        var (r, log, series) = FollowMetric(metric, perplexityFalls);
        Assert.Equal(stops, r.StoppedEarly);
        Assert.Equal(stops ? 1 : 8, r.Best!.Step);
        Assert.Equal(stops ? 3 : 8, r.Steps);
        if (stops) Assert.Contains(log.Infos, i => i.Contains($"early stopping: {metric} has not improved for 2 evaluations"));
        Assert.Equal(series.Count, log.Evals.Count - 1); // plus step 0
    }

    [Fact]
    public void ResumeDoesNotRedoStepZeroAndKeepsTheBest()
    {
        var c = Small();
        c.Steps = 4; c.EvalEvery = 2; c.SaveEvery = 1; c.Metric = "suite:capability"; // falling: the best stays at step 2
        var first = new BNormEvaluator();
        Trainer.Run(c, false, new ListLog(), suites: first);
        Assert.Equal([0, 2, 4], first.Calls.Select(x => x.step));

        var more = Small(c.Output);
        more.EvalSuite = c.EvalSuite; more.Steps = 6; more.EvalEvery = 2; more.SaveEvery = 1; more.Metric = "suite:capability";
        var second = new BNormEvaluator();
        var log = new ListLog();
        var r = Trainer.Run(more, true, log, suites: second);
        Assert.Equal([6], second.Calls.Select(x => x.step));
        var steps = Records(c.Output).Where(o => o.ContainsKey("suite:task")).Select(o => o["step"]!.GetValue<int>()).ToList();
        Assert.Equal([0, 2, 4, 6], steps); // one step-0 record, one uninterrupted log
        // The best by the suite metric came back from the checkpoint: step 6 does not beat step 2.
        Assert.Equal(2, r.Best!.Step);
        Assert.Contains(log.Infos, i => i.Contains("is the best adapter by suite:capability (step 2 of 6"));
    }

    [Fact]
    public void FullFineTuningIsEvaluatedWithoutAnAdapterName()
    {
        var c = Small();
        c.Method = "full"; c.Steps = 2; c.EvalEvery = 1; c.Lr = 1e-3;
        var suites = new BNormEvaluator();
        Trainer.Run(c, false, new ListLog(), suites: suites);
        Assert.Equal([0, 1, 2], suites.Calls.Select(x => x.step));
        Assert.All(suites.Calls, x => Assert.Null(x.adapter));
        Assert.NotEqual(suites.Calls[0].result["suite:task"], suites.Calls[^1].result["suite:task"]); // the weights it measured moved
    }

    [Fact]
    public void ConfigurationErrorsAreClear()
    {
        var noSuite = TrainingRunTests.Small();
        noSuite.Metric = "suite:task";
        var ex = Assert.Throws<ArgumentException>(noSuite.Validate);
        Assert.Contains("`metric` suite:task needs an evaluation suite", ex.Message);
        Assert.Contains("`eval_suite`", ex.Message);

        var unknown = Small();
        unknown.Metric = "suite:speed";
        Assert.Contains("suite:task, suite:capability, suite:safety, suite:perplexity (got 'suite:speed')", Assert.Throws<ArgumentException>(unknown.Validate).Message);

        ex = Assert.Throws<ArgumentException>(() => Trainer.Run(Small(), false, new ListLog()));
        Assert.Contains("no evaluator was given", ex.Message);
        ex = Assert.Throws<ArgumentException>(() => Trainer.Run(TrainingRunTests.Small(), false, new ListLog(), suites: new BNormEvaluator()));
        Assert.Contains("`eval_suite` names no evaluation suite", ex.Message);

        // Classification trains a score head the suites' language-model cases never reach.
        var labelled = Small();
        labelled.Data = Path.Combine(Fixtures.TempDir(), "labels.jsonl");
        File.WriteAllLines(labelled.Data, ["{\"text\": \"reset my password\", \"label\": \"accounts\"}", "{\"text\": \"refund me\", \"label\": \"billing\"}"]);
        ex = Assert.Throws<ArgumentException>(() => Trainer.Run(labelled, false, new ListLog(), suites: new BNormEvaluator()));
        Assert.Contains("`eval_suite` during training needs language-modelling data", ex.Message);

        // A metric the suites do not report stops the run before training, naming what they do report.
        var missing = Small();
        missing.Metric = "suite:safety";
        var lk = Assert.Throws<LoraKitException>(() => Trainer.Run(missing, false, new ListLog(), suites: new BNormEvaluator()));
        Assert.Contains("`metric` suite:safety: the evaluation suites report no such metric at step 0 (they report suite:task, suite:capability, suite:perplexity)", lk.Message);
        Assert.False(Directory.Exists(Path.Combine(missing.Output, "checkpoints")));
    }

    [Fact]
    public void ConfigFilesAndIdentity()
    {
        var dir = Fixtures.TempDir();
        string Write(string name, string text) { var p = Path.Combine(dir, name); File.WriteAllText(p, text); return p; }
        Assert.Equal(["a,b.jsonl"], TrainConfig.Load(Write("one.yaml", "eval_suite: a,b.jsonl\n")).EvalSuite); // a path, not a list
        Assert.Equal(["a.jsonl", "b.jsonl"], TrainConfig.Load(Write("two.yaml", "eval_suite: [a.jsonl, b.jsonl]\n")).EvalSuite);
        Assert.Equal(["a.jsonl"], TrainConfig.Load(Write("alias.json", """{"eval_suites": ["a.jsonl"], "metric_for_best_model": "suite:perplexity"}""")).EvalSuite);
        Assert.Equal("suite:perplexity", TrainConfig.Load(Write("metric.json", """{"metric": "suite:perplexity"}""")).Metric);
        Assert.Contains("bad.json:1: 'eval_suite' must be a file path or a list of them, not a number",
            Assert.Throws<LoraKitException>(() => TrainConfig.Load(Write("bad.json", """{"eval_suite": 5}"""))).Message);
        foreach (var (text, expected) in new[]
                 {
                     ("eval_suite: [a.jsonl, [b]]\n", "bad.yaml:1: 'eval_suite' must be a file path or a list of them, not a mapping"),
                     ("eval_suite: ''\n", "bad.yaml:1: 'eval_suite' must be a file path or a list of them"),
                     ("eval_suite: []\n", "bad.yaml:1: 'eval_suite' is an empty list"),
                     ("metric: suite:speed\n", "bad.yaml:1: metric 'suite:speed' is not supported (eval_loss, eval_accuracy, suite:task"),
                 })
        {
            var e = Assert.Throws<LoraKitException>(() => TrainConfig.Load(Write("bad.yaml", text)));
            Assert.Contains(expected, e.Message);
            Assert.Null(Fuzz.FuzzContract.JudgeMessage(e.Message));
        }

        // Left out of the identity when there are none, so runs written before eval_suite existed still resume.
        Assert.False(new TrainConfig().Identity().ContainsKey("eval_suite"));
        Assert.Equal("[\"s.jsonl\"]", new TrainConfig { EvalSuite = ["s.jsonl"] }.Identity()["eval_suite"]!.ToJsonString());
    }

    [Fact]
    public void CliFlagIsRepeatableAndSuiteMetricsNeedIt()
    {
        var (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", Path.Combine(Fixtures.TempDir(), "run"), "--metric", "suite:task", "--device", "cpu");
        Assert.Equal(1, code);
        Assert.Contains("--metric suite:task needs an evaluation suite to measure it: give --eval-suite", stderr);

        // Each --eval-suite is one path (commas are part of it); both reach the run's configuration.
        var dir = Fixtures.TempDir();
        (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", Path.Combine(dir, "run"), "--eval-suite", Path.Combine(dir, "x,y.jsonl"), "--eval-suite", Path.Combine(dir, "z.jsonl"), "--device", "cpu", "--steps", "1");
        Assert.NotEqual(0, code);
        Assert.Contains("x,y.jsonl", stderr);
    }
}
