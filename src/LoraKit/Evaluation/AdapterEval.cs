namespace LoraKit.Evaluation;

/// <summary>One adapter's evaluation: what it is (as given, and its content hash), its results and scores, how it compares with the base, the gate's verdict.</summary>
public sealed record AdapterEval(string Adapter, string Sha256, IReadOnlyList<CaseResult> Results, Comparison Comparison, GateResult Gate)
{
    /// <summary>The adapter's scores over all suites.</summary>
    public Scores Scores => Comparison.Adapter;

    /// <summary>The registered version the adapter was given as (<c>--adapter NAME@REF</c>), or null for a folder.</summary>
    public RegisteredAdapter? Registered { get; init; }
}

/// <summary>A registered adapter version as an evaluation report records it: name, version number and content hash.</summary>
public sealed record RegisteredAdapter(string Name, int Version, string Sha256)
{
    /// <summary>"NAME@VERSION".</summary>
    public string Ref => $"{Name}@{Version}";
}
