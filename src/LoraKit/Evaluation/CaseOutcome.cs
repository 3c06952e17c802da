namespace LoraKit.Evaluation;

/// <summary>How one case came out when evaluated through a chat client.</summary>
public enum CaseOutcome
{
    /// <summary>The expectation held (for a rubric: the judge said PASS).</summary>
    Passed,
    /// <summary>The expectation did not hold; the reason says why.</summary>
    Failed,
    /// <summary>
    /// The case cannot be scored from a chat response: choices and perplexity need log-likelihoods, labels a
    /// classification adapter (LoraKit's own runner scores them), a rubric needs a judge and none was given.
    /// </summary>
    NotApplicable,
    /// <summary>The case was not scored: the model or the judge call failed, or the judge's answer was unparseable.</summary>
    Error,
}
