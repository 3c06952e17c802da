using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// <c>train --eval-suite</c> with the real suite evaluator: step 0 is the base (the planted suite's capability and
/// safety cases all pass on it), later evaluations measure the adapter, and a suite metric drives best/.
/// </summary>
[Collection(GlobalRng.Name)]
public class TrainWithSuiteTests(PlantedAdapters planted) : IClassFixture<PlantedAdapters>
{
    [Fact]
    public void SuitesRunAtStepZeroAndAtEveryEvaluationThroughTheCli()
    {
        var dir = Fixtures.TempDir();
        var data = Path.Combine(dir, "train.jsonl");
        // Training to answer the capability prompts differently: the capability pass rate must fall from 1.
        File.WriteAllLines(data, PlantedAdapters.CapabilityPrompts.Select(p => JsonSerializer.Serialize(new { prompt = p, completion = " zebra zebra zebra" })));
        var run = Path.Combine(dir, "run");
        var (code, stdout, stderr) = CliTests.RunCli("train", "--model", planted.Model, "--data", data, "--output", run, "--eval-suite", planted.Suite,
            "--steps", "30", "--eval-every", "15", "--lr", "1e-2", "--batch-size", "4", "--lora-dropout", "0", "--metric", "suite:capability", "--device", "cpu");
        Assert.True(code == 0, stderr);
        Assert.Contains("suite:capability", stdout);
        var evals = File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject())
            .Where(o => o.ContainsKey("suite:capability")).ToList();
        Assert.Equal([0, 15, 30], evals.Select(o => o["step"]!.GetValue<int>()));
        Assert.Equal(1.0, evals[0]["suite:capability"]!.GetValue<double>());
        Assert.Equal(1.0, evals[0]["suite:safety"]!.GetValue<double>());
        Assert.True(evals[^1]["suite:capability"]!.GetValue<double>() < 1.0, evals[^1].ToJsonString());
        Assert.True(evals[0]["suite:perplexity"]!.GetValue<double>() > 1);
    }
}
