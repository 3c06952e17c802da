namespace LoraKit.Evaluation;

/// <summary>One adapter's evaluation: what it is (as given, and its content hash), its results and scores, how it compares with the base, the gate's verdict.</summary>
public sealed record AdapterEval(string Adapter, string Sha256, IReadOnlyList<CaseResult> Results, Comparison Comparison, GateResult Gate)
{
    /// <summary>The adapter's scores over all suites.</summary>
    public Scores Scores => Comparison.Adapter;
}
