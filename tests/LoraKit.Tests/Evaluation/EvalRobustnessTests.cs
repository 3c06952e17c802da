using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Evaluation;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// <c>lorakit eval</c> on awkward input: an adapter that does not fit the base fails before the base's run, not after
/// it; every case (skipped ones too) moves the progress bar to its total; an evaluation in which every case is skipped
/// passes no gate; an output directory with a directory in the report's place is refused before any work.
/// </summary>
[Collection(GlobalRng.Name)]
public class EvalRobustnessTests
{
    static EvalSuite Suite(params object[] cases)
    {
        var path = Path.Combine(Fixtures.TempDir(), "robust.jsonl");
        File.WriteAllLines(path, cases.Select(c => JsonSerializer.Serialize(c)));
        return EvalSuite.Load(path);
    }

    static readonly object Generated = new { id = "gen", kind = "capability", prompt = "hello", expect = new { contains = "x" }, max_tokens = 2 };

    [Fact]
    public void AnAdapterThatDoesNotFitTheBaseFailsBeforeTheBaseRuns()
    {
        var adapter = Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", "a"));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(adapter, "adapter_config.json")))!;
        config["r"] = config["r"]!.GetValue<int>() * 2; // the weights now contradict the config's rank
        File.WriteAllText(Path.Combine(adapter, "adapter_config.json"), config.ToJsonString());
        using var model = LoraKitModel.FromPretrained(Fixtures.Model("llama"), "cpu", "fp32");
        int progress = 0;
        var e = Assert.ThrowsAny<Exception>(() => model.Evaluate([Suite(Generated)], [Fixtures.Path_("adapters", "llama", "a"), adapter],
            new EvalOptions { Progress = (_, _, _) => progress++ }));
        Assert.Equal(0, progress);
        Assert.Contains(adapter, e.Message);
    }

    [Fact]
    public void SkippedCasesCountTowardsTheProgressTotal_AndAllSkippedPassesNoGate()
    {
        var tooLong = string.Join(" ", Enumerable.Repeat("word", 400)); // past the fixture's 256-token context
        var suite = Suite(Generated,
            new { id = "label", kind = "task", prompt = "hi", expect = new { label = "a" } },
            new { id = "long", kind = "capability", prompt = tooLong, expect = new { contains = "x" } });
        using var model = LoraKitModel.FromPretrained(Fixtures.Model("llama"), "cpu", "fp32");
        var seen = new List<(int done, int total)>();
        var report = model.Evaluate([suite], [Fixtures.Path_("adapters", "llama", "a")], new EvalOptions { Progress = (d, t, _) => seen.Add((d, t)) });
        Assert.Equal(6, seen[^1].total);
        Assert.Equal(seen[^1].total, seen[^1].done);
        Assert.Contains(seen, x => x.done == 3); // the base's three cases, two of them skipped
        Assert.Equal(CaseStatus.Skipped, report.BaseResults.Single(r => r.Id == "long").Status);

        // Only cases nobody can run: the gate has nothing to compare and must not pass.
        var skippedOnly = Suite(new { id = "label", kind = "task", prompt = "hi", expect = new { label = "a" } },
            new { id = "long", kind = "capability", prompt = tooLong, expect = new { contains = "x" } });
        var none = model.Evaluate([skippedOnly], [Fixtures.Path_("adapters", "llama", "a")]);
        Assert.False(none.Adapters[0].Gate.Passed);
        Assert.Contains(none.Adapters[0].Gate.Reasons, r => r.Contains("nothing was checked"));
    }

    [Fact]
    public void AnAdapterTheCallerLoadedIsLeftAsItWas()
    {
        using var model = LoraKitModel.FromPretrained(Fixtures.Model("llama"), "cpu", "fp32").WithAdapter(Fixtures.Path_("adapters", "llama", "b"), "eval-0");
        model.Evaluate([Suite(Generated)], [Fixtures.Path_("adapters", "llama", "a")]);
        Assert.True(model.Lora.Configs.ContainsKey("eval-0"), "the evaluation deleted the caller's adapter named like its own");
    }

    [Fact]
    public void BadThresholdsAndFlagCombinationsFailInOneLineNamingTheFlag()
    {
        var suite = Path.Combine(Fixtures.TempDir(), "s.jsonl");
        File.WriteAllText(suite, JsonSerializer.Serialize(Generated) + "\n");
        foreach (var (flag, value) in new[] { ("--max-capability-drop", "NaN"), ("--max-perplexity-increase", "-1"), ("--min-task-score", "101"), ("--max-safety-regressions", "-1") })
        {
            var (code, _, stderr) = CliTests.RunCli("eval", "--model", Fixtures.Model("llama"), "--suite", suite, flag, value);
            Assert.Equal(1, code);
            Assert.Contains(flag, stderr);
            Fuzz.FuzzContract.CheckCli("eval-flags", flag, code, stderr);
        }
        var output = Path.Combine(Fixtures.TempDir(), "merged");
        var (c, _, err) = CliTests.RunCli("merge", "--model", Fixtures.Model("llama"), "--adapter", Fixtures.Path_("adapters", "llama", "a"), "--output", output,
            "--no-gate", "--gate-report", suite);
        Assert.Equal(1, c);
        Assert.Contains("not both", err);
        Assert.False(Directory.Exists(output));
    }

    [Fact]
    public void AnOutputDirectoryWithADirectoryInTheReportsPlaceIsRefusedBeforeAnyWork()
    {
        var dir = Fixtures.TempDir();
        Directory.CreateDirectory(Path.Combine(dir, EvalReport.JsonFile));
        var suite = Path.Combine(Fixtures.TempDir(), "s.jsonl");
        File.WriteAllText(suite, JsonSerializer.Serialize(Generated) + "\n");
        var (code, _, stderr) = CliTests.RunCli("eval", "--model", "/nonexistent-model", "--suite", suite, "--output", dir);
        Assert.Equal(1, code);
        Assert.Contains("eval.json there is a directory", stderr);
    }
}
