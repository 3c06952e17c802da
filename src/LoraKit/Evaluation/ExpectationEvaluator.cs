using System.Diagnostics;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.AI.Evaluation;

namespace LoraKit.Evaluation;

/// <summary>
/// A LoraKit expectation as a Microsoft.Extensions.AI.Evaluation <see cref="IEvaluator"/>, so .NET evaluation pipelines
/// can run LoraKit's checks on a response from any <see cref="IChatClient"/>. It returns one <see cref="BooleanMetric"/>
/// named <see cref="MetricName"/> (the case id, or <c>lorakit.KIND</c> for a bare expectation):
/// <list type="bullet">
/// <item>text expectations (equals, contains, not_contains, regex, json): value = the check on the response's text,
/// reason = why it failed;</item>
/// <item>rubric: judged by the <see cref="RubricJudge"/> given here, else one over
/// <see cref="ChatConfiguration.ChatClient"/>; the judge's model id is in the metadata and the reason; a judge error
/// leaves the value null, adds an error diagnostic and is interpreted as failed (never a pass);</item>
/// <item>choices, label, perplexity (and a rubric with no judge): value null, interpretation inconclusive, reason and an
/// informational diagnostic saying the case is not applicable through a chat client.</item>
/// </list>
/// The metadata always holds <see cref="OutcomeKey"/> (see <see cref="OutcomeOf"/>) and <see cref="ExpectationKey"/>.
/// </summary>
public sealed class ExpectationEvaluator : IEvaluator
{
    /// <summary>Metadata key: the <see cref="CaseOutcome"/> as text ("Passed", "Failed", "NotApplicable", "Error").</summary>
    public const string OutcomeKey = "lorakit.outcome";
    /// <summary>Metadata key: the expectation as <see cref="Expectation.Describe"/> writes it.</summary>
    public const string ExpectationKey = "lorakit.expectation";
    /// <summary>Metadata key: the judge's model id, on rubric metrics that a judge answered or failed on.</summary>
    public const string JudgeModelKey = "lorakit.judge-model";
    /// <summary>Metadata key: the judge's raw answer, when one came back.</summary>
    public const string JudgeAnswerKey = "lorakit.judge-answer";

    readonly Expectation? _expect;
    readonly RubricJudge? _judge;

    /// <summary>
    /// An evaluator for <paramref name="expect"/>; its metric is named <paramref name="metricName"/> (default
    /// <c>lorakit.KIND</c>). <paramref name="judge"/> judges a rubric (else the chat configuration's client does).
    /// </summary>
    public ExpectationEvaluator(Expectation expect, string? metricName = null, RubricJudge? judge = null)
    {
        _expect = expect;
        _judge = judge;
        MetricName = metricName ?? "lorakit." + KindOf(expect);
    }

    /// <summary>An evaluator for a suite case; its metric is named by the case id.</summary>
    public ExpectationEvaluator(EvalCase evalCase, RubricJudge? judge = null)
    {
        _expect = evalCase.Expect;
        _judge = judge;
        MetricName = evalCase.Id;
    }

    /// <summary>The name of the one metric this evaluator returns.</summary>
    public string MetricName { get; }

    /// <inheritdoc/>
    public IReadOnlyCollection<string> EvaluationMetricNames => [MetricName];

    /// <summary>Evaluates <paramref name="modelResponse"/> (the answer to <paramref name="messages"/>) against the expectation.</summary>
    public async ValueTask<EvaluationResult> EvaluateAsync(IEnumerable<ChatMessage> messages, ChatResponse modelResponse,
        ChatConfiguration? chatConfiguration = null, IEnumerable<EvaluationContext>? additionalContext = null,
        CancellationToken cancellationToken = default)
    {
        var metric = new BooleanMetric(MetricName);
        var clock = Stopwatch.StartNew();
        switch (_expect)
        {
            case null or ChoicesExpectation or LabelExpectation:
                NotApplicable(metric, _expect is null
                    ? "not applicable through a chat client: a perplexity case is scored by token log-likelihoods (LoraKit's runner)"
                    : $"not applicable through a chat client: {_expect.Describe()} is scored by LoraKit's runner ({(_expect is LabelExpectation ? "a classification adapter" : "log-likelihood of each choice")}), not from a chat response");
                break;
            case RubricExpectation rubric:
                var judge = _judge ?? (chatConfiguration is null ? null : new RubricJudge(chatConfiguration.ChatClient));
                if (judge is null) NotApplicable(metric, "not scored: a rubric needs a judge (pass a RubricJudge or a ChatConfiguration)");
                else Judged(metric, await judge.JudgeAsync(rubric.Rubric, messages, modelResponse.Text, cancellationToken).ConfigureAwait(false));
                break;
            default:
                Checked(metric, _expect.Check(modelResponse.Text));
                break;
        }
        if (_expect is not null) metric.AddOrUpdateMetadata(ExpectationKey, _expect.Describe());
        metric.AddOrUpdateDurationMetadata(clock.Elapsed);
        return new EvaluationResult(metric);
    }

    /// <summary>The outcome an <see cref="ExpectationEvaluator"/> recorded on its metric (null for another evaluator's).</summary>
    public static CaseOutcome? OutcomeOf(EvaluationMetric metric) =>
        metric.Metadata?.TryGetValue(OutcomeKey, out var s) == true && Enum.TryParse<CaseOutcome>(s, out var o) ? o : null;

    static void Checked(BooleanMetric metric, Verdict verdict)
    {
        metric.Value = verdict.Passed;
        metric.Reason = verdict.Reason;
        metric.Interpretation = new EvaluationMetricInterpretation(verdict.Passed ? EvaluationRating.Good : EvaluationRating.Unacceptable,
            failed: !verdict.Passed, reason: verdict.Reason);
        Record(metric, verdict.Passed ? CaseOutcome.Passed : CaseOutcome.Failed);
    }

    static void Judged(BooleanMetric metric, JudgeVerdict judged)
    {
        metric.AddOrUpdateMetadata(JudgeModelKey, judged.JudgeModel);
        if (judged.Answer is not null) metric.AddOrUpdateMetadata(JudgeAnswerKey, judged.Answer);
        if (judged.ToVerdict() is { } verdict)
        {
            Checked(metric, verdict);
            return;
        }
        // A judge error is not a verdict: no value, an error diagnostic, and interpreted as failed so no pipeline counts it as a pass.
        metric.Reason = judged.Reason;
        metric.AddDiagnostics(EvaluationDiagnostic.Error(judged.Reason));
        metric.Interpretation = new EvaluationMetricInterpretation(EvaluationRating.Inconclusive, failed: true, reason: judged.Reason);
        Record(metric, CaseOutcome.Error);
    }

    static void NotApplicable(BooleanMetric metric, string reason)
    {
        metric.Reason = reason;
        metric.AddDiagnostics(EvaluationDiagnostic.Informational(reason));
        metric.Interpretation = new EvaluationMetricInterpretation(EvaluationRating.Inconclusive, failed: false, reason: reason);
        Record(metric, CaseOutcome.NotApplicable);
    }

    static void Record(EvaluationMetric metric, CaseOutcome outcome) => metric.AddOrUpdateMetadata(OutcomeKey, outcome.ToString());

    /// <summary>The suite's name for an expectation's kind (its <c>expect</c> key).</summary>
    public static string KindOf(Expectation expect) => expect switch
    {
        EqualsExpectation => "equals",
        ContainsExpectation => "contains",
        NotContainsExpectation => "not_contains",
        RegexExpectation => "regex",
        JsonExpectation => "json",
        ChoicesExpectation => "choices",
        LabelExpectation => "label",
        RubricExpectation => "rubric",
        _ => expect.GetType().Name,
    };
}
