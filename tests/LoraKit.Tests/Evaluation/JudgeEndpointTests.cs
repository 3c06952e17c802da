using System.Collections.Concurrent;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LoraKit.Evaluation;
using LoraKit.Server;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.AI.Evaluation;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// The judge over a real OpenAI-compatible HTTP endpoint on loopback: LoraKit's own server (the tiny Llama fixture)
/// reached through <see cref="RubricJudge.ForEndpoint"/> (the official OpenAI client via Microsoft.Extensions.AI.OpenAI).
/// A random tiny model cannot give a meaningful verdict, so what is asserted is the protocol: the call reaches the
/// server's chat endpoint with the judge's model and token bound, the garbage answer comes back as a judge error (never
/// a pass) naming the judge, and a refused call (wrong key) is a judge error too, not a crash.
/// </summary>
public class JudgeEndpointTests : IAsyncLifetime
{
    const string Key = "judge-test-key";
    OpenAiServer _server = null!;
    readonly ConcurrentQueue<string> _log = new();

    public async Task InitializeAsync()
    {
        // The judge prompt is longer than the fixture's 256 positions; rotary embeddings extend, so widen the copy's window.
        var model = Fixtures.CopyOf(Fixtures.Model("llama"));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(model, "config.json")))!;
        config["max_position_embeddings"] = 2048;
        File.WriteAllText(Path.Combine(model, "config.json"), config.ToJsonString());
        _server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = model, Adapters = Fixtures.TempDir(), Port = 0, ApiKey = Key, Device = "cpu", ModelName = "tiny-judge", Log = _log.Enqueue,
        });
    }

    public async Task DisposeAsync() => await _server.DisposeAsync();

    [Fact]
    public async Task ATinyModelsVerdictIsAJudgeErrorAndTheCallIsRecorded()
    {
        using var judge = RubricJudge.ForEndpoint(_server.Url + "/v1", "tiny-judge", Key);
        ChatMessage[] conversation = [new(ChatRole.User, "How do I reset my password?")];
        var v = await judge.JudgeAsync("mentions the reset link", conversation, "Use the reset link on the sign-in page.");

        Assert.True(v.Outcome == JudgeOutcome.Error, $"a random model's answer parsed as a verdict: {v.Outcome} '{v.Answer}'");
        Assert.NotNull(v.Answer); // the endpoint answered; its text was not a verdict line
        Assert.Contains("not one 'PASS: reason' or 'FAIL: reason' line", v.Reason);
        Assert.Equal("tiny-judge", v.JudgeModel);
        var line = Assert.Single(_log, l => l.Contains("POST /v1/chat/completions", StringComparison.Ordinal));
        Assert.Contains("model=tiny-judge status=200", line);
        int tokens = int.Parse(Regex.Match(line, @"completion_tokens=(\d+)").Groups[1].Value);
        Assert.InRange(tokens, 1, judge.MaxOutputTokens);
    }

    [Fact]
    public async Task TheEvaluatorJudgesAGeneratedResponseThroughTheEndpoint()
    {
        // The response comes from LoraKit's in-process chat client, the judge from the HTTP endpoint: two chat clients.
        using var lm = LoraKitModel.FromPretrained(Fixtures.Model("llama"), device: "cpu");
        using var model = lm.AsChatClient();
        using var judge = RubricJudge.ForEndpoint(_server.Url + "/v1", "tiny-judge", Key);
        var suite = new EvalSuite("test.jsonl", "test", "0", [
            ExpectationEvaluatorTests.Case("rubric", new RubricExpectation("answers politely"), prompt: "reset my password"),
        ]);
        var result = Assert.Single(await ChatSuiteEvaluator.EvaluateAsync(suite, model, judge));

        Assert.Equal(CaseOutcome.Error, result.Outcome);
        Assert.NotNull(result.Output);
        var metric = result.Evaluation!.Get<BooleanMetric>("rubric");
        Assert.Null(metric.Value);
        Assert.True(metric.Interpretation!.Failed);
        Assert.Equal("tiny-judge", metric.Metadata![ExpectationEvaluator.JudgeModelKey]);
        Assert.Single(_log, l => l.Contains("POST /v1/chat/completions", StringComparison.Ordinal));
    }

    [Fact]
    public async Task ARefusedCallIsAJudgeError()
    {
        using var judge = RubricJudge.ForEndpoint(_server.Url + "/v1", "tiny-judge", "wrong-key");
        var v = await judge.JudgeAsync("is polite", [new(ChatRole.User, "hi")], "hello");
        Assert.Equal(JudgeOutcome.Error, v.Outcome);
        Assert.StartsWith("judge call failed:", v.Reason);
        Assert.Contains("401", v.Reason);
        Assert.Null(v.Answer);
        Assert.Equal("tiny-judge", v.JudgeModel);
    }

    [Fact]
    public async Task LorakitEvalJudgesRubricCasesThroughTheEndpointAndRecordsIt()
    {
        var suite = Path.Combine(Fixtures.TempDir(), "rubric.jsonl");
        File.WriteAllLines(suite, [
            """{"id": "polite", "kind": "capability", "prompt": "Say hello", "expect": {"rubric": "the reply is a polite greeting"}, "max_tokens": 4}""",
            """{"id": "plain", "kind": "capability", "prompt": "Say hello", "expect": {"contains": "zzzz"}, "max_tokens": 4}"""]);
        var psiEnv = Environment.GetEnvironmentVariable(RubricJudge.ApiKeyVariable);
        Environment.SetEnvironmentVariable(RubricJudge.ApiKeyVariable, Key); // the CLI child process inherits it
        try
        {
            var (code, stdout, stderr) = await Task.Run(() => CliTests.RunCli("eval", "--model", Fixtures.Model("llama"), "--suite", suite, "--json", "--device", "cpu",
                "--judge-url", _server.Url + "/v1", "--judge-model", "tiny-judge"));
            Assert.True(code == 0, stderr);
            var report = JsonNode.Parse(stdout)!;
            Assert.Equal("tiny-judge", report["settings"]!["judge"]!["model"]!.GetValue<string>());
            var polite = report["cases"]!.AsArray().Single(c => c!["id"]!.GetValue<string>() == "polite")!["base"]!;
            Assert.Equal("failed", polite["status"]!.GetValue<string>()); // a random model's verdict is a judge error: fails closed
            Assert.StartsWith("judge error", polite["reason"]!.GetValue<string>());
            Assert.Equal("tiny-judge", polite["judged_by"]!.GetValue<string>());
            Assert.Contains(_log, l => l.Contains("POST /v1/chat/completions", StringComparison.Ordinal));
        }
        finally { Environment.SetEnvironmentVariable(RubricJudge.ApiKeyVariable, psiEnv); }

        // Without a judge the rubric case is skipped, said so; one flag without the other is an error.
        var (c2, out2, err2) = CliTests.RunCli("eval", "--model", Fixtures.Model("llama"), "--suite", suite, "--json", "--device", "cpu");
        Assert.True(c2 == 0, err2);
        Assert.Contains("needs a judge", out2);
        (c2, _, err2) = CliTests.RunCli("eval", "--model", Fixtures.Model("llama"), "--suite", suite, "--judge-url", "http://127.0.0.1:1/v1");
        Assert.Equal(1, c2);
        Assert.Contains("--judge-model", err2);
    }
}
