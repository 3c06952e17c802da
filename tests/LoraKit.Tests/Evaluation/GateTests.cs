using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Evaluation;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// The gate end to end on real files: planted regressions fail it (exit 3, the regressed ids listed), an adapter with
/// B = 0 passes, and merge refuses without a passed report for this adapter on this base.
/// </summary>
[Collection(GlobalRng.Name)]
public class GateTests(PlantedAdapters planted) : IClassFixture<PlantedAdapters>
{
    EvalReport Evaluate() => planted.Report.Value;

    [Fact]
    public void TheBasePassesItsOwnCasesAndZeroBChangesNothing()
    {
        var r = Evaluate();
        Assert.Equal(1.0, r.BaseScores.Rate(CaseKind.Capability));
        Assert.Equal(1.0, r.BaseScores.Rate(CaseKind.Safety));
        var zero = r.Adapters[0];
        Assert.True(zero.Gate.Passed, string.Join("; ", zero.Gate.Reasons));
        Assert.Empty(zero.Comparison.Regressions);
        Assert.Empty(zero.Comparison.Improvements);
        Assert.Equal(r.BaseScores.Perplexity!.Value, zero.Scores.Perplexity!.Value, 1e-6);
        Assert.Equal(r.BaseResults.Select(x => x.Output), zero.Results.Select(x => x.Output));
    }

    [Fact]
    public void AnAdapterThatChangesCapabilityAnswersFailsTheGateNamingThem()
    {
        var a = Evaluate().Adapters[1];
        Assert.False(a.Gate.Passed);
        var regressed = a.Comparison.Regressions.Select(x => x.Key).ToList();
        Assert.Contains("planted/cap-0", regressed);
        Assert.Contains("planted/cap-1", regressed);
        Assert.Contains("planted/cap-2", regressed);
        Assert.Contains(a.Gate.Reasons, x => x.Contains("capability pass rate drops") && x.Contains("planted/cap-0"));
    }

    [Fact]
    public void AnAdapterThatBreaksASafetyCaseFailsTheGate()
    {
        var a = Evaluate().Adapters[2];
        Assert.False(a.Gate.Passed);
        Assert.True(a.Comparison.Regressions.Any(x => x.Key == "planted/safe-lock"), "safe-lock answered: " + a.Results.Single(x => x.Id == "safe-lock").Output
            + " | base: " + Evaluate().BaseResults.Single(x => x.Id == "safe-lock").Output);
        Assert.Contains(a.Gate.Reasons, x => x.Contains("safety") && x.Contains("planted/safe-lock"));
        Assert.Contains("sure, here", a.Results.Single(x => x.Id == "safe-lock").Output);
    }

    [Fact]
    public void CliGateExitsThreeAndListsRegressionsAndWritesTheReport()
    {
        var outDir = Path.Combine(Fixtures.TempDir(), "eval");
        var (code, stdout, stderr) = CliTests.RunCli("eval", "--model", planted.Model, "--adapter", planted.Zero, "--adapter", planted.BreaksSafety,
            "--suite", planted.Suite, "--gate", "--json", "--output", outDir, "--device", "cpu");
        Assert.True(code == EvalCommandExit.GateFailed, $"exit {code}: {stderr}");
        var o = JsonNode.Parse(stdout)!.AsObject();
        var adapters = o["adapters"]!.AsArray();
        Assert.True(adapters[0]!["gate"]!["passed"]!.GetValue<bool>());
        Assert.False(adapters[1]!["gate"]!["passed"]!.GetValue<bool>());
        Assert.Contains("planted/safe-lock", adapters[1]!["regressions"]!.AsArray().Select(x => x!.GetValue<string>()));
        Assert.Equal(Lora.AdapterDigest.Compute(planted.Zero), adapters[0]!["sha256"]!.GetValue<string>());
        var saved = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "eval.json")))!;
        Assert.Equal(EvalReport.Format, saved["format"]!.GetValue<string>());
        Assert.Equal(Models.BaseFingerprint.Of(planted.Model), saved["base"]!["fingerprint"]!.GetValue<string>());
        Assert.Equal(64, saved["suites"]![0]!["sha256"]!.GetValue<string>().Length);
        var html = File.ReadAllText(Path.Combine(outDir, "eval.html"));
        Assert.Contains("safe-lock", html);
        Assert.DoesNotContain("<script", html);
        // Without --gate the verdict is reported but the exit code is 0; the text form says it in words.
        (code, stdout, stderr) = CliTests.RunCli("eval", "--model", planted.Model, "--adapter", planted.BreaksSafety, "--suite", planted.Suite, "--device", "cpu");
        Assert.True(code == 0, stderr);
        Assert.Contains("gate FAILED", stdout);
        Assert.Contains("planted/safe-lock", stdout);
    }

    [Fact]
    public void MergeNeedsAPassedGateForThisAdapterOnThisBase()
    {
        var dir = Fixtures.TempDir();
        var (passed, failed) = planted.GateReports(dir);
        int code;
        string stderr;

        string Out(string name) => Path.Combine(dir, name);
        // No report: refused, naming the way out.
        (code, _, stderr) = CliTests.RunCli("merge", "--model", planted.Model, "--adapter", planted.Zero, "--output", Out("m0"));
        Assert.Equal(1, code);
        Assert.Contains("--gate-report", stderr);
        Assert.False(Directory.Exists(Out("m0")));
        // A report for another adapter.
        (code, _, stderr) = CliTests.RunCli("merge", "--model", planted.Model, "--adapter", planted.BreaksSafety, "--output", Out("m1"), "--gate-report", Path.Combine(passed, "eval.json"));
        Assert.Equal(1, code);
        Assert.Contains("does not cover this adapter", stderr);
        // A failed gate.
        (code, _, stderr) = CliTests.RunCli("merge", "--model", planted.Model, "--adapter", planted.BreaksCapability, "--output", Out("m2"), "--gate-report", Path.Combine(failed, "eval.json"));
        Assert.Equal(1, code);
        Assert.Contains("failed the gate", stderr);
        Assert.Contains("capability", stderr);
        // A report made on another base.
        (code, _, stderr) = CliTests.RunCli("merge", "--model", Fixtures.Model("llama"), "--adapter", planted.Zero, "--output", Out("m3"), "--gate-report", passed);
        Assert.Equal(1, code);
        Assert.Contains("another base model", stderr);
        // Not a report at all.
        File.WriteAllText(Out("junk.json"), "{\"format\": 3}");
        (code, _, stderr) = CliTests.RunCli("merge", "--model", planted.Model, "--adapter", planted.Zero, "--output", Out("m4"), "--gate-report", Out("junk.json"));
        Assert.Equal(1, code);
        Assert.Contains("not a LoraKit evaluation report", stderr);
        foreach (var m in new[] { "m1", "m2", "m3", "m4" }) Assert.False(Directory.Exists(Out(m)), m);

        // The passed report: merged, and the config records the gate.
        (code, _, stderr) = CliTests.RunCli("merge", "--model", planted.Model, "--adapter", planted.Zero, "--output", Out("ok"), "--gate-report", Path.Combine(passed, "eval.json"));
        Assert.True(code == 0, stderr);
        var prov = JsonNode.Parse(File.ReadAllText(Path.Combine(Out("ok"), "config.json")))!["lorakit_merge"]!;
        Assert.Equal("passed", prov["gate"]!.GetValue<string>());
        Assert.Equal(2, prov["gate_thresholds"]!["max_capability_drop"]!.GetValue<double>());
        Assert.Equal(Lora.AdapterDigest.Compute(planted.Zero), prov["adapter_sha256"]!.GetValue<string>());
        // --no-gate: merged with a loud warning, recorded.
        (code, _, stderr) = CliTests.RunCli("merge", "--model", planted.Model, "--adapter", planted.BreaksCapability, "--output", Out("nogate"), "--no-gate");
        Assert.True(code == 0, stderr);
        Assert.Contains("WITHOUT an evaluation gate", stderr);
        Assert.Equal("skipped", JsonNode.Parse(File.ReadAllText(Path.Combine(Out("nogate"), "config.json")))!["lorakit_merge"]!["gate"]!.GetValue<string>());
    }
}

/// <summary>The CLI's gate exit code, as the tests see it.</summary>
static class EvalCommandExit
{
    public const int GateFailed = 3;
}
