using LoraKit.Evaluation;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.AI.Evaluation;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// The judge's protocol and strict parsing. A real judge is a large remote model that cannot run here, so these tests
/// stand a scripted chat client in for it (a test double that answers fixed text, throws or stalls, and records what
/// it was asked); the judge over a real OpenAI-compatible HTTP endpoint is in <see cref="JudgeEndpointTests"/>.
/// </summary>
public class RubricJudgeTests
{
    /// <summary>Test double for a remote judge model: answers what it is told to, and records the request.</summary>
    sealed class ScriptedJudge(Func<CancellationToken, Task<string>> answer, string? modelId = "judge-1") : IChatClient
    {
        public List<(List<ChatMessage> Messages, ChatOptions? Options)> Requests { get; } = [];
        public ScriptedJudge(string text, string? modelId = "judge-1") : this(_ => Task.FromResult(text), modelId) { }

        public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
        {
            Requests.Add((messages.ToList(), options));
            return new ChatResponse(new ChatMessage(ChatRole.Assistant, await answer(cancellationToken))) { ModelId = modelId };
        }

        public IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default) =>
            throw new NotSupportedException();
        public object? GetService(Type serviceType, object? serviceKey = null) => null;
        public void Dispose() { }
    }

    static readonly ChatMessage[] Conversation = [new(ChatRole.User, "How do I reset my password?")];

    [Theory]
    [InlineData("PASS: it explains the reset steps.", JudgeOutcome.Pass, "it explains the reset steps.")]
    [InlineData("  FAIL: it invents a phone number.\n", JudgeOutcome.Fail, "it invents a phone number.")]
    [InlineData("pass:polite and on topic", JudgeOutcome.Pass, "polite and on topic")]
    [InlineData("\n\nFAIL : off topic\n\n", JudgeOutcome.Fail, "off topic")]
    public void ParsesOneVerdictLine(string answer, JudgeOutcome outcome, string reason) =>
        Assert.Equal((outcome, reason), RubricJudge.Parse(answer));

    [Theory]
    [InlineData("")]
    [InlineData("PASS")]
    [InlineData("PASS:   ")]
    [InlineData("PASS - looks fine")]
    [InlineData("The response passes. PASS: fine")]
    [InlineData("PASS: fine\nFAIL: actually not")]
    [InlineData("Reasoning first.\nPASS: fine")]
    [InlineData("**PASS**: fine")]
    [InlineData("PASSED: fine")]
    public void AnythingElseIsUnparseable(string answer) => Assert.Null(RubricJudge.Parse(answer));

    [Fact]
    public async Task AsksWithTheFixedPromptAtTemperatureZeroAndBoundedTokens()
    {
        var client = new ScriptedJudge("FAIL: it does not mention the reset link.");
        var judge = new RubricJudge(client) { Model = "judge-model", MaxOutputTokens = 40 };
        var v = await judge.JudgeAsync("mentions the reset link", Conversation, "Call us.");

        Assert.Equal(JudgeOutcome.Fail, v.Outcome);
        Assert.False(v.Passed);
        Assert.Equal("it does not mention the reset link.", v.Reason);
        Assert.Equal("judge-1", v.JudgeModel); // what the endpoint reported answering with
        Assert.Equal("judged by judge-1: it does not mention the reset link.", v.ToVerdict()!.Reason);
        var (messages, options) = Assert.Single(client.Requests);
        Assert.Equal((0f, 40, "judge-model"), (options!.Temperature, options.MaxOutputTokens, options.ModelId));
        Assert.Equal(RubricJudge.Instructions, messages[0].Text);
        Assert.Equal(ChatRole.System, messages[0].Role);
        foreach (var part in new[] { "<rubric>\nmentions the reset link\n</rubric>", "How do I reset my password?", "<response>\nCall us.\n</response>" })
            Assert.Contains(part, messages[1].Text);
    }

    [Fact]
    public async Task ASuiteCaseIsJudgedWithItsRubricAndConversation()
    {
        var client = new ScriptedJudge("PASS: it refuses.");
        var judge = new RubricJudge(client);
        var c = ExpectationEvaluatorTests.Case("r", new RubricExpectation("refuses to share the password"), prompt: "tell me the admin password");
        Assert.Equal(JudgeOutcome.Pass, (await judge.JudgeAsync(c, "I can't share that.")).Outcome);
        var prompt = Assert.Single(client.Requests).Messages[1].Text;
        foreach (var part in new[] { "refuses to share the password", "tell me the admin password", "I can't share that." })
            Assert.Contains(part, prompt);
        var notRubric = ExpectationEvaluatorTests.Case("e", new EqualsExpectation("x"), prompt: "p");
        await Assert.ThrowsAsync<ArgumentException>(() => judge.JudgeAsync(notRubric, "x"));
    }

    [Fact]
    public void AsTheRunnersJudgeAJudgeErrorFailsClosed()
    {
        var c = ExpectationEvaluatorTests.Case("r", new RubricExpectation("is polite"), prompt: "hi");
        var (passed, by) = new RubricJudge(new ScriptedJudge("PASS: polite.")).AsJudgeFunc()(c, "hello");
        Assert.Equal((true, "judged by judge-1: polite.", "judge-1"), (passed.Passed, passed.Reason, by));
        var (garbled, by2) = new RubricJudge(new ScriptedJudge("no idea")).AsJudgeFunc()(c, "hello");
        Assert.False(garbled.Passed);
        Assert.StartsWith("judge error: judge answer is not one", garbled.Reason);
        Assert.Equal("judge-1", by2);
    }

    [Fact]
    public async Task AnUnparseableAnswerIsAJudgeErrorNotAPass()
    {
        var judge = new RubricJudge(new ScriptedJudge("Yes, this looks good to me!", modelId: null)) { Model = "configured" };
        var v = await judge.JudgeAsync("is polite", Conversation, "Sure.");
        Assert.Equal(JudgeOutcome.Error, v.Outcome);
        Assert.False(v.Passed);
        Assert.Null(v.ToVerdict());
        Assert.Contains("not one 'PASS: reason' or 'FAIL: reason' line", v.Reason);
        Assert.Equal("Yes, this looks good to me!", v.Answer);
        Assert.Equal("configured", v.JudgeModel); // the endpoint named none
    }

    [Fact]
    public async Task FailedAndStalledCallsAreJudgeErrorsButTheCallersCancellationIsThrown()
    {
        var failing = new RubricJudge(new ScriptedJudge(_ => throw new HttpRequestException("connection refused\nmore")));
        var v = await failing.JudgeAsync("r", Conversation, "x");
        Assert.Equal((JudgeOutcome.Error, "judge call failed: connection refused more"), (v.Outcome, v.Reason));

        var stalled = new ScriptedJudge(async ct => { await Task.Delay(Timeout.Infinite, ct); return "PASS: late"; });
        v = await new RubricJudge(stalled) { Timeout = TimeSpan.FromMilliseconds(200) }.JudgeAsync("r", Conversation, "x");
        Assert.Equal(JudgeOutcome.Error, v.Outcome);
        Assert.Contains("timed out", v.Reason);

        using var cancel = new CancellationTokenSource(TimeSpan.FromMilliseconds(100));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => new RubricJudge(stalled).JudgeAsync("r", Conversation, "x", cancel.Token));
    }

    [Fact]
    public async Task TheEvaluatorTakesTheJudgeFromTheChatConfigurationAndRecordsIt()
    {
        var evaluator = new ExpectationEvaluator(new RubricExpectation("mentions the reset link"), "rubric-1");
        var response = new ChatResponse(new ChatMessage(ChatRole.Assistant, "Use the reset link."));

        var passed = (await evaluator.EvaluateAsync(Conversation, response, new ChatConfiguration(new ScriptedJudge("PASS: it mentions the link."))))
            .Get<BooleanMetric>("rubric-1");
        Assert.True(passed.Value);
        Assert.Equal("judged by judge-1: it mentions the link.", passed.Reason);
        Assert.Equal("judge-1", passed.Metadata![ExpectationEvaluator.JudgeModelKey]);
        Assert.Equal(CaseOutcome.Passed, ExpectationEvaluator.OutcomeOf(passed));

        var garbled = (await evaluator.EvaluateAsync(Conversation, response, new ChatConfiguration(new ScriptedJudge("maybe?"))))
            .Get<BooleanMetric>("rubric-1");
        Assert.Null(garbled.Value);
        Assert.True(garbled.Interpretation!.Failed);
        Assert.Contains(garbled.Diagnostics!, d => d.Severity == EvaluationDiagnosticSeverity.Error);
        Assert.Equal(CaseOutcome.Error, ExpectationEvaluator.OutcomeOf(garbled));
        Assert.Equal("maybe?", garbled.Metadata![ExpectationEvaluator.JudgeAnswerKey]);
    }

    [Fact]
    public void ForEndpointRefusesABadUrlOrModel()
    {
        Assert.Contains("not an absolute http(s) URL", Assert.Throws<LoraKitException>(() => RubricJudge.ForEndpoint("localhost:8000", "m", null)).Message);
        Assert.Contains("not an absolute http(s) URL", Assert.Throws<LoraKitException>(() => RubricJudge.ForEndpoint("file:///etc/passwd", "m", null)).Message);
        Assert.Contains("model name is empty", Assert.Throws<LoraKitException>(() => RubricJudge.ForEndpoint("http://127.0.0.1:1/v1", " ", null)).Message);
        using var judge = RubricJudge.ForEndpoint("http://127.0.0.1:1/v1", "judge-model", null);
        Assert.Equal("judge-model", judge.Model);
    }
}
