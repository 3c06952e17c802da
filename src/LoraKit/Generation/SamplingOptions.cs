namespace LoraKit.Generation;

/// <summary>
/// Decoding settings. Temperature 0 is greedy. Otherwise logits are processed as transformers does
/// (temperature, then top-k, then top-p) and sampled with a seeded generator. Temperatures below
/// <see cref="GreedyBelow"/> decode greedily, as vLLM does (dividing logits by 1e-300 overflows to NaN).
/// </summary>
public sealed record SamplingOptions
{
    public int MaxNewTokens { get; init; } = 64;
    public double Temperature { get; init; }
    public int TopK { get; init; }
    public double TopP { get; init; } = 1.0;
    public long? Seed { get; init; }
    /// <summary>Generation stops after any of these ids (they are kept in the output ids, as transformers does).</summary>
    public IReadOnlyCollection<int> EosTokenIds { get; init; } = [];
    /// <summary>Generation stops once the decoded text contains one of these; the text is cut before it.</summary>
    public IReadOnlyList<string> StopStrings { get; init; } = [];

    /// <summary>vLLM's _SAMPLING_EPS: a smaller temperature is greedy decoding.</summary>
    public const double GreedyBelow = 1e-5;

    public bool IsGreedy => Temperature < GreedyBelow;

    public void Validate()
    {
        if (MaxNewTokens < 0) throw new ArgumentException("max new tokens must be ≥ 0");
        if (!(Temperature >= 0 && double.IsFinite(Temperature))) throw new ArgumentException("temperature must be a finite number ≥ 0");
        if (TopK < 0) throw new ArgumentException("top-k must be ≥ 0 (0 disables it)");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentException("top-p must be in (0, 1]");
        if (StopStrings.Any(string.IsNullOrEmpty)) throw new ArgumentException("stop strings must not be empty");
    }
}
