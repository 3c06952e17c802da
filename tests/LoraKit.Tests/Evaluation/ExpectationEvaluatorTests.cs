using System.Text.RegularExpressions;
using LoraKit.Evaluation;
using LoraKit.Tokenization;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.AI.Evaluation;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// LoraKit's expectations as Microsoft.Extensions.AI.Evaluation evaluators on a real chat client (the tiny Llama fixture
/// through <see cref="LoraKitModel.AsChatClient"/>): each expectation is built from what the model really generated (a
/// random tiny model's text cannot be typed by hand), so one variant must pass and a perturbed one must fail; and a
/// whole suite through <see cref="ChatSuiteEvaluator"/>, with the cases a chat client cannot score reported as such.
/// </summary>
public class ExpectationEvaluatorTests
{
    static readonly ChatOptions Greedy = new() { Temperature = 0, MaxOutputTokens = 12 };

    internal static EvalCase Case(string id, Expectation? expect, string? prompt = null, IReadOnlyList<ChatTurn>? messages = null, string? text = null) =>
        new() { Id = id, Kind = CaseKind.Capability, Prompt = prompt, Messages = messages, Text = text, Expect = expect, MaxTokens = 12, Where = $"test.jsonl:{id}" };

    static async Task<BooleanMetric> Evaluate(IEvaluator evaluator, IList<ChatMessage> messages, ChatResponse response)
    {
        var result = await evaluator.EvaluateAsync(messages, response);
        return Assert.IsType<BooleanMetric>(Assert.Single(result.Metrics).Value);
    }

    static void AssertPassed(BooleanMetric m)
    {
        Assert.True(m.Value, m.Reason);
        Assert.False(m.Interpretation!.Failed);
        Assert.Equal(CaseOutcome.Passed, ExpectationEvaluator.OutcomeOf(m));
    }

    static void AssertFailed(BooleanMetric m, string reasonPart)
    {
        Assert.False(m.Value);
        Assert.Contains(reasonPart, m.Reason);
        Assert.True(m.Interpretation!.Failed);
        Assert.Equal(CaseOutcome.Failed, ExpectationEvaluator.OutcomeOf(m));
    }

    [Fact]
    public async Task TextExpectationsScoreARealChatClientsResponse()
    {
        using var lm = LoraKitModel.FromPretrained(Fixtures.Model("llama"), device: "cpu");
        using var client = lm.AsChatClient();
        ChatMessage[] messages = [new(ChatRole.User, "reset my password")];
        var response = await client.GetResponseAsync(messages, Greedy);
        string output = response.Text.Trim();
        Assert.True(output.Length >= 2, $"the fixture generated too little to build expectations from: '{output}'");
        string piece = output[..2];

        var equals = await Evaluate(new ExpectationEvaluator(new EqualsExpectation(output)), messages, response);
        AssertPassed(equals);
        Assert.Equal("lorakit.equals", equals.Name);
        Assert.Equal(new EqualsExpectation(output).Describe(), equals.Metadata![ExpectationEvaluator.ExpectationKey]);
        AssertFailed(await Evaluate(new ExpectationEvaluator(new EqualsExpectation(output + "!")), messages, response), "expected");
        AssertPassed(await Evaluate(new ExpectationEvaluator(new ContainsExpectation([piece])), messages, response));
        AssertFailed(await Evaluate(new ExpectationEvaluator(new ContainsExpectation([piece, output + "!"])), messages, response), "missing");
        AssertFailed(await Evaluate(new ExpectationEvaluator(new NotContainsExpectation([piece])), messages, response), "contains");
        AssertPassed(await Evaluate(new ExpectationEvaluator(new NotContainsExpectation([output + "!"])), messages, response));
        var escaped = Regex.Escape(piece);
        AssertPassed(await Evaluate(new ExpectationEvaluator(new RegexExpectation(escaped, new Regex(escaped))), messages, response));
        var anchored = "^" + Regex.Escape(output + "!") + "$";
        AssertFailed(await Evaluate(new ExpectationEvaluator(new RegexExpectation(anchored, new Regex(anchored))), messages, response), "no match");
    }

    [Fact]
    public async Task JsonExpectationAndComposingInAnEvaluationPipeline()
    {
        // The generated text's JSON-ness is whatever the random model produced, so JSON is checked on responses made here.
        ChatMessage[] messages = [new(ChatRole.User, "give JSON")];
        var json = new ExpectationEvaluator(new JsonExpectation(), "is-json");
        AssertPassed(await Evaluate(json, messages, new ChatResponse(new ChatMessage(ChatRole.Assistant, "```json\n{\"a\": [1, 2]}\n```"))));
        AssertFailed(await Evaluate(json, messages, new ChatResponse(new ChatMessage(ChatRole.Assistant, "{\"a\": "))), "not JSON");

        // MEAI's CompositeEvaluator runs several LoraKit evaluators on one response; each metric keeps its name.
        var composite = new CompositeEvaluator(json, new ExpectationEvaluator(new ContainsExpectation(["b"]), "has-b"));
        var result = await composite.EvaluateAsync(messages, new ChatResponse(new ChatMessage(ChatRole.Assistant, "{\"a\": 1}")));
        Assert.True(result.Get<BooleanMetric>("is-json").Value);
        Assert.False(result.Get<BooleanMetric>("has-b").Value);
    }

    [Fact]
    public async Task CasesAChatClientCannotScoreAreNotApplicableNotFailures()
    {
        ChatMessage[] messages = [new(ChatRole.User, "pick one")];
        var response = new ChatResponse(new ChatMessage(ChatRole.Assistant, "0"));
        foreach (var (evalCase, why) in new (EvalCase, string)[]
        {
            (Case("choice", new ChoicesExpectation(["yes", "no"], 0), prompt: "?"), "log-likelihood"),
            (Case("label", new LabelExpectation("billing"), prompt: "?"), "classification adapter"),
            (Case("ppl", null, text: "some text"), "perplexity"),
            (Case("rubric", new RubricExpectation("is polite"), prompt: "?"), "needs a judge"),
        })
        {
            var m = await Evaluate(new ExpectationEvaluator(evalCase), messages, response);
            Assert.Equal(evalCase.Id, m.Name);
            Assert.Null(m.Value);
            Assert.Contains(why, m.Reason);
            Assert.False(m.Interpretation!.Failed);
            Assert.Equal(EvaluationRating.Inconclusive, m.Interpretation.Rating);
            Assert.Equal(CaseOutcome.NotApplicable, ExpectationEvaluator.OutcomeOf(m));
            Assert.Contains(m.Diagnostics!, d => d.Severity == EvaluationDiagnosticSeverity.Informational);
        }
    }

    [Fact]
    public async Task ASuiteRunsThroughARealChatClient()
    {
        using var lm = LoraKitModel.FromPretrained(Fixtures.Model("llama"), device: "cpu");
        using var client = lm.AsChatClient();
        ChatTurn[] conversation = [new("system", "You answer briefly."), new("user", "what is 2+2?")];
        // What the model says to each generated case (greedy, one request at a time, as the suite below runs them).
        string fromPrompt = (await client.GetResponseAsync([new ChatMessage(ChatRole.User, "reset my password")], Greedy)).Text;
        string fromMessages = (await client.GetResponseAsync(
            [new ChatMessage(ChatRole.System, "You answer briefly."), new ChatMessage(ChatRole.User, "what is 2+2?")], Greedy)).Text;

        var suite = new EvalSuite("test.jsonl", "test", "0", [
            Case("prompt-pass", new EqualsExpectation(fromPrompt), prompt: "reset my password"),
            Case("messages-fail", new EqualsExpectation(fromMessages + "!"), messages: conversation),
            Case("choice", new ChoicesExpectation(["4", "5"], 0), prompt: "2+2="),
            Case("label", new LabelExpectation("billing"), prompt: "refund me"),
            Case("ppl", null, text: "The quick brown fox."),
            Case("rubric", new RubricExpectation("answers the question"), messages: conversation),
        ]);
        var results = await ChatSuiteEvaluator.EvaluateAsync(suite, client);

        Assert.Equal(suite.Cases.Select(c => c.Id), results.Select(r => r.Case.Id));
        var byId = results.ToDictionary(r => r.Case.Id);
        Assert.Equal(CaseOutcome.Passed, byId["prompt-pass"].Outcome);
        Assert.Equal(fromPrompt, byId["prompt-pass"].Output);
        Assert.True(byId["prompt-pass"].Evaluation!.Get<BooleanMetric>("prompt-pass").Value);
        Assert.Equal(CaseOutcome.Failed, byId["messages-fail"].Outcome);
        Assert.Equal(fromMessages, byId["messages-fail"].Output);
        Assert.Contains("expected", byId["messages-fail"].Reason);
        foreach (var id in new[] { "choice", "label", "ppl" })
        {
            Assert.Equal(CaseOutcome.NotApplicable, byId[id].Outcome);
            Assert.Null(byId[id].Output); // never sent to the model
            Assert.Contains("not applicable through a chat client", byId[id].Reason);
        }
        // A rubric is generated (the model answers) but, with no judge, not scored.
        Assert.Equal(CaseOutcome.NotApplicable, byId["rubric"].Outcome);
        Assert.Equal(fromMessages, byId["rubric"].Output);
        Assert.Contains("needs a judge", byId["rubric"].Reason);
    }

    [Fact]
    public async Task AFailingModelCallIsAnErrorForThatCaseOnly()
    {
        using var lm = LoraKitModel.FromPretrained(Fixtures.Model("llama"), device: "cpu");
        using var client = lm.AsChatClient();
        var suite = new EvalSuite("test.jsonl", "test", "0", [
            Case("a", new ContainsExpectation(["x"]), prompt: "hello"),
            Case("b", new ChoicesExpectation(["x", "y"], 1), prompt: "hello"),
        ]);
        // The model id picks an adapter the model does not have, so every generation request fails.
        var results = await ChatSuiteEvaluator.EvaluateAsync(suite, client, baseOptions: new ChatOptions { ModelId = "no-such-adapter" });
        Assert.Equal(CaseOutcome.Error, results[0].Outcome);
        Assert.StartsWith("model call failed:", results[0].Reason);
        Assert.Equal(CaseOutcome.NotApplicable, results[1].Outcome);
    }

    [Fact]
    public void CaseSettingsBecomeChatOptionsAndMessages()
    {
        var c = Case("s", new EqualsExpectation("x"), messages: [new("system", "be brief"), new("user", "hi")]) with { MaxTokens = 7, Temperature = 0.5, TopP = 0.9, Seed = 42 };
        var o = ChatSuiteEvaluator.OptionsFor(c, new ChatOptions { ModelId = "adapter-a", MaxOutputTokens = 999 });
        Assert.Equal(("adapter-a", 7, 0.5f, 0.9f, 42L), (o.ModelId, o.MaxOutputTokens, o.Temperature, o.TopP, o.Seed));
        var m = ChatSuiteEvaluator.MessagesFor(c);
        Assert.Equal([ChatRole.System, ChatRole.User], m.Select(x => x.Role));
        Assert.Equal(["be brief", "hi"], m.Select(x => x.Text));
        var p = Assert.Single(ChatSuiteEvaluator.MessagesFor(Case("p", new EqualsExpectation("x"), prompt: "raw")));
        Assert.Equal((ChatRole.User, "raw"), (p.Role, p.Text));
    }
}
