using Microsoft.Extensions.AI;
using Microsoft.Extensions.AI.Evaluation;

namespace LoraKit.Evaluation;

/// <summary>
/// Runs a whole <see cref="EvalSuite"/> against any <see cref="IChatClient"/>, each case through an
/// <see cref="ExpectationEvaluator"/>. This is the portable path for .NET users (a hosted model, another runtime);
/// LoraKit's own runner is the one that compares a base with its adapters and also scores choices, labels and perplexity.
/// <list type="bullet">
/// <item>A <c>prompt</c> case is sent as one user message (a chat client has no raw-completion mode, so unlike LoraKit's
/// runner it goes through the endpoint's chat template); <c>messages</c> are sent as they are.</item>
/// <item>Per-case sampling: <c>max_tokens</c>, <c>temperature</c> (0 = greedy), <c>top_p</c> and <c>seed</c>
/// override <c>baseOptions</c> (which can set, e.g., <c>ModelId</c> to pick an adapter).</item>
/// <item>Choices, label and perplexity cases are <see cref="CaseOutcome.NotApplicable"/> without calling the model; a
/// failing model call is <see cref="CaseOutcome.Error"/> for that case; only the caller's cancellation is thrown.</item>
/// </list>
/// </summary>
public static class ChatSuiteEvaluator
{
    /// <summary>
    /// Evaluates every case of <paramref name="suite"/> on <paramref name="model"/>, at most <paramref name="concurrency"/>
    /// at once (a LoraKit chat client batches concurrent requests); results come back in suite order.
    /// <paramref name="judge"/> scores rubric cases (without one they are not applicable).
    /// </summary>
    public static async Task<IReadOnlyList<ChatCaseResult>> EvaluateAsync(EvalSuite suite, IChatClient model, RubricJudge? judge = null,
        ChatOptions? baseOptions = null, int concurrency = 1, CancellationToken cancellationToken = default)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(concurrency, 1);
        var results = new ChatCaseResult[suite.Cases.Count];
        await Parallel.ForEachAsync(Enumerable.Range(0, results.Length),
            new ParallelOptions { MaxDegreeOfParallelism = concurrency, CancellationToken = cancellationToken },
            async (i, ct) => results[i] = await EvaluateCaseAsync(suite.Cases[i], model, judge, baseOptions, ct).ConfigureAwait(false))
            .ConfigureAwait(false);
        return results;
    }

    /// <summary>Evaluates one case (see the class contract).</summary>
    public static async Task<ChatCaseResult> EvaluateCaseAsync(EvalCase evalCase, IChatClient model, RubricJudge? judge = null,
        ChatOptions? baseOptions = null, CancellationToken cancellationToken = default)
    {
        var evaluator = new ExpectationEvaluator(evalCase, judge);
        if (!evalCase.IsGenerated)
        {
            var skipped = await evaluator.EvaluateAsync([], new ChatResponse(), cancellationToken: cancellationToken).ConfigureAwait(false);
            return new ChatCaseResult(evalCase, CaseOutcome.NotApplicable, null, skipped.Get<BooleanMetric>(evaluator.MetricName).Reason, null);
        }
        var messages = MessagesFor(evalCase);
        ChatResponse response;
        try
        {
            response = await model.GetResponseAsync(messages, OptionsFor(evalCase, baseOptions), cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
        {
            return new ChatCaseResult(evalCase, CaseOutcome.Error, null, $"model call failed: {e.Message.Split('\n')[0]}", null);
        }
        var result = await evaluator.EvaluateAsync(messages, response, cancellationToken: cancellationToken).ConfigureAwait(false);
        var metric = result.Get<BooleanMetric>(evaluator.MetricName);
        return new ChatCaseResult(evalCase, ExpectationEvaluator.OutcomeOf(metric)!.Value, response.Text, metric.Reason, result);
    }

    /// <summary>The chat messages a generated case sends: its conversation, or its prompt as one user message.</summary>
    public static IList<ChatMessage> MessagesFor(EvalCase evalCase) =>
        evalCase.Messages is { } turns ? [.. turns.Select(t => new ChatMessage(new ChatRole(t.Role), t.Content))]
        : evalCase.Prompt is { } prompt ? [new ChatMessage(ChatRole.User, prompt)]
        : throw new ArgumentException($"{evalCase.Where}: case '{evalCase.Id}' has no prompt or messages to send", nameof(evalCase));

    /// <summary>The case's sampling settings over a copy of <paramref name="baseOptions"/>.</summary>
    public static ChatOptions OptionsFor(EvalCase evalCase, ChatOptions? baseOptions)
    {
        var o = baseOptions?.Clone() ?? new ChatOptions();
        o.MaxOutputTokens = evalCase.MaxTokens;
        o.Temperature = (float)evalCase.Temperature;
        o.TopP = (float)evalCase.TopP;
        if (evalCase.Seed is { } seed) o.Seed = seed;
        return o;
    }
}
