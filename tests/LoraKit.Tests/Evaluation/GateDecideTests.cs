using System.Text;
using System.Text.Json.Nodes;
using LoraKit.Evaluation;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// The gate's edges on hand-made results (no model): nothing checked, a base that fails everything, perplexity on one
/// side only or not finite, a minimum task score with every task case skipped, pairing by case rather than by order,
/// and the report JSON and HTML of such results (JSON has no NaN; model output is HTML-encoded).
/// </summary>
public class GateDecideTests
{
    static CaseResult R(string id, CaseKind kind, CaseStatus status, double? ll = null, int? tokens = null, string? output = null) =>
        new("s", id, kind, status, output, status == CaseStatus.Skipped ? "skipped" : null, ll, tokens);

    static GateResult Decide(IReadOnlyList<CaseResult> b, IReadOnlyList<CaseResult> a, GateThresholds? t = null) =>
        GateResult.Decide(Comparison.Of(b, a), t ?? new GateThresholds());

    [Fact]
    public void AnAdapterWithEveryCaseSkippedFailsBecauseNothingWasChecked()
    {
        var b = new[] { R("c", CaseKind.Capability, CaseStatus.Passed) };
        var a = new[] { R("c", CaseKind.Capability, CaseStatus.Skipped) };
        var g = Decide(b, a);
        Assert.False(g.Passed);
        Assert.Contains(g.Reasons, x => x.Contains("nothing was checked"));
        // One verdict, or one perplexity, is something checked.
        Assert.True(Decide(b, [R("c", CaseKind.Capability, CaseStatus.Passed)]).Passed);
        Assert.True(Decide([R("p", CaseKind.Task, CaseStatus.Scored, -10, 5)], [R("p", CaseKind.Task, CaseStatus.Scored, -10, 5)]).Passed);
    }

    [Fact]
    public void ABaseThatFailsEveryCapabilityCaseCannotBeRegressedFrom()
    {
        var b = new[] { R("c1", CaseKind.Capability, CaseStatus.Failed), R("c2", CaseKind.Capability, CaseStatus.Failed) };
        var a = new[] { R("c1", CaseKind.Capability, CaseStatus.Failed), R("c2", CaseKind.Capability, CaseStatus.Passed) };
        var c = Comparison.Of(b, a);
        Assert.Empty(c.Regressions);
        Assert.Equal(["s/c2"], c.Improvements.Select(x => x.Key));
        Assert.True(GateResult.Decide(c, new GateThresholds()).Passed);
    }

    [Fact]
    public void ResultsArePairedByCaseNotByOrder()
    {
        var b = new[] { R("x", CaseKind.Safety, CaseStatus.Passed), R("y", CaseKind.Safety, CaseStatus.Failed) };
        var a = new[] { R("y", CaseKind.Safety, CaseStatus.Failed), R("x", CaseKind.Safety, CaseStatus.Failed) };
        var c = Comparison.Of(b, a);
        Assert.Equal(["s/x"], c.Regressions.Select(x => x.Key));
        Assert.Contains(GateResult.Decide(c, new GateThresholds()).Reasons, r => r.Contains("safety") && r.Contains("s/x"));
    }

    [Fact]
    public void PerplexityOnOneSideOnlyIsNotCompared_ButANonFiniteOneFails()
    {
        var cap = R("c", CaseKind.Capability, CaseStatus.Passed);
        var ppl = R("p", CaseKind.Task, CaseStatus.Scored, -20, 10);
        Assert.True(Decide([cap, ppl], [cap, R("p", CaseKind.Task, CaseStatus.Skipped)]).Passed);
        foreach (var bad in new[] { double.NaN, double.NegativeInfinity })
        {
            var a = new[] { cap, R("p", CaseKind.Task, CaseStatus.Scored, bad, 10) };
            var g = Decide([cap, ppl], a);
            Assert.False(g.Passed, $"perplexity from log-likelihood {bad} passed");
            Assert.Contains(g.Reasons, r => r.Contains("perplexity"));
            // The report still serializes: JSON has no NaN.
            var json = Scores.Of(a).ToJson().ToJsonString();
            Assert.Contains("\"perplexity\":null", json);
        }
    }

    [Fact]
    public void PerplexityIsTokenWeighted()
    {
        // Two texts: 1 token at NLL 4, 3 tokens at NLL 0 → corpus mean NLL 1 (not the mean of means, 2).
        var s = Scores.Of([R("a", CaseKind.Task, CaseStatus.Scored, -4, 1), R("b", CaseKind.Task, CaseStatus.Scored, 0, 3)]);
        Assert.Equal(Math.Exp(1), s.Perplexity!.Value, 1e-12);
        Assert.Equal(4, s.PerplexityTokens);
    }

    [Fact]
    public void AMinimumTaskScoreWithEveryTaskCaseSkippedFails()
    {
        var b = new[] { R("t", CaseKind.Task, CaseStatus.Skipped), R("c", CaseKind.Capability, CaseStatus.Passed) };
        var g = Decide(b, b, new GateThresholds { MinTaskScore = 50 });
        Assert.False(g.Passed);
        Assert.Contains(g.Reasons, r => r.Contains("no task case had a verdict"));
        Assert.True(Decide(b, b).Passed); // without the minimum, a suite with no task verdicts is fine
    }

    [Fact]
    public void NoCapabilityCasesMeansNoCapabilityCheck()
    {
        var b = new[] { R("s", CaseKind.Safety, CaseStatus.Passed) };
        var g = Decide(b, b, new GateThresholds { MaxCapabilityDrop = 0 });
        Assert.True(g.Passed, string.Join("; ", g.Reasons));
    }

    [Fact]
    public void TheReportEncodesModelOutputInHtmlAndKeepsItVerbatimInJson()
    {
        const string hostile = "</pre><script>alert('x')</script><img src=x onerror=alert(1)>";
        var suite = SuiteReader.Parse(Encoding.UTF8.GetBytes("""{"id": "c", "kind": "capability", "prompt": "p", "expect": {"equals": "ok"}}""" + "\n"), "s.jsonl", "s.jsonl");
        var b = new[] { R("c", CaseKind.Capability, CaseStatus.Passed, output: "ok") };
        var a = new[] { R("c", CaseKind.Capability, CaseStatus.Failed, output: hostile) };
        var c = Comparison.Of(b, a);
        var report = new EvalReport
        {
            Model = "<b>m</b>", BaseFingerprint = "f", Suites = [suite], BaseResults = b, Thresholds = new GateThresholds(),
            Adapters = [new AdapterEval("<i>adapter</i>", "sha", a, c, GateResult.Decide(c, new GateThresholds()))],
        };
        var dir = Fixtures.TempDir();
        report.Write(dir);
        var html = File.ReadAllText(Path.Combine(dir, EvalReport.HtmlFile));
        Assert.DoesNotContain("<script", html, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("<img", html, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("<i>adapter", html);
        Assert.Contains("&lt;/pre&gt;&lt;script&gt;", html);
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, EvalReport.JsonFile)))!;
        Assert.Equal(hostile, json["cases"]![0]!["adapters"]![0]!["output"]!.GetValue<string>());
        Assert.False(json["adapters"]![0]!["gate"]!["passed"]!.GetValue<bool>());
    }
}
