namespace LoraKit.Evaluation;

/// <summary>How a case came out for one model: passed or failed its expectation, scored (perplexity), or skipped (why in the reason).</summary>
public enum CaseStatus { Passed, Failed, Scored, Skipped }

/// <summary>
/// One case's outcome on one model (the base, or the base with an adapter). <see cref="Output"/> is the generated
/// text, the picked choice or the predicted label; <see cref="Reason"/> says in plain words why it failed or was
/// skipped; perplexity cases carry their log-likelihood, generated cases the number of tokens generated.
/// </summary>
public sealed record CaseResult(string Suite, string Id, CaseKind Kind, CaseStatus Status, string? Output = null, string? Reason = null,
    double? LogLikelihood = null, int? Tokens = null, string? JudgedBy = null, int? GeneratedTokens = null)
{
    /// <summary>The case's name in reports and gate reasons: <c>SUITE/ID</c> (ids are unique within a suite).</summary>
    public string Key => KeyOf(Suite, Id);
    /// <summary>The key of case <paramref name="id"/> in suite <paramref name="suite"/>.</summary>
    public static string KeyOf(string suite, string id) => $"{suite}/{id}";
    /// <summary>Passed or failed: a verdict the gate can compare.</summary>
    public bool HasVerdict => Status is CaseStatus.Passed or CaseStatus.Failed;
}
