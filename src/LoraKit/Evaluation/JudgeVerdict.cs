namespace LoraKit.Evaluation;

/// <summary>What a <see cref="RubricJudge"/> decided about one output.</summary>
public enum JudgeOutcome
{
    /// <summary>The judge answered <c>PASS: reason</c>.</summary>
    Pass,
    /// <summary>The judge answered <c>FAIL: reason</c>.</summary>
    Fail,
    /// <summary>
    /// No usable verdict: the call failed or timed out, or the answer was not one <c>PASS:</c>/<c>FAIL:</c> line. The case
    /// was not scored; it is never counted as a pass.
    /// </summary>
    Error,
}

/// <summary>
/// A judge's verdict on one rubric case, with what a report needs to say how it was reached: the judge's model id
/// (<c>judged by X</c>), its raw answer (null when no answer came back) and how long the call took.
/// </summary>
public sealed record JudgeVerdict(JudgeOutcome Outcome, string Reason, string JudgeModel, string? Answer, TimeSpan Duration)
{
    /// <summary>Whether the judge passed the output (false for a failure and for a judge error).</summary>
    public bool Passed => Outcome == JudgeOutcome.Pass;

    /// <summary>
    /// The verdict in the suite's terms, its reason naming the judge (<c>judged by X: ...</c>); null for a judge error,
    /// since the case was not scored.
    /// </summary>
    public Verdict? ToVerdict() => Outcome switch
    {
        JudgeOutcome.Pass => new Verdict(true, $"judged by {JudgeModel}: {Reason}"),
        JudgeOutcome.Fail => Verdict.Fail($"judged by {JudgeModel}: {Reason}"),
        _ => null,
    };
}
