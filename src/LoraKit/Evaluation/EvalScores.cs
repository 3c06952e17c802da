using System.Text.Json.Nodes;

namespace LoraKit.Evaluation;

/// <summary>Pass counts of one kind of case. <see cref="PassRate"/> is over cases with a verdict (skipped ones excluded).</summary>
public sealed record KindScore(int Passed, int Failed, int Skipped)
{
    /// <summary>Cases with a verdict.</summary>
    public int Total => Passed + Failed;
    /// <summary>0..1, or null when no case of this kind had a verdict.</summary>
    public double? PassRate => Total == 0 ? null : (double)Passed / Total;
}

/// <summary>
/// A model's scores over some cases: pass counts per kind, and the perplexity of the perplexity cases (exp of the
/// token-weighted mean NLL over all their tokens, as lm-evaluation-harness computes a corpus perplexity).
/// </summary>
public sealed record Scores(IReadOnlyDictionary<CaseKind, KindScore> Kinds, double? Perplexity, int PerplexityTokens)
{
    /// <summary>Scores of these results.</summary>
    public static Scores Of(IEnumerable<CaseResult> results)
    {
        var list = results.ToList();
        var kinds = Enum.GetValues<CaseKind>().ToDictionary(k => k, k =>
        {
            var of = list.Where(r => r.Kind == k).ToList();
            return new KindScore(of.Count(r => r.Status == CaseStatus.Passed), of.Count(r => r.Status == CaseStatus.Failed), of.Count(r => r.Status == CaseStatus.Skipped));
        });
        var ppl = list.Where(r => r.Status == CaseStatus.Scored && r.LogLikelihood is not null && r.Tokens > 0).ToList();
        int tokens = ppl.Sum(r => r.Tokens!.Value);
        double? perplexity = tokens == 0 ? null : Math.Exp(-ppl.Sum(r => r.LogLikelihood!.Value) / tokens);
        return new Scores(kinds, perplexity, tokens);
    }

    /// <summary>Pass rate of a kind (0..1), or null.</summary>
    public double? Rate(CaseKind kind) => Kinds.TryGetValue(kind, out var s) ? s.PassRate : null;

    /// <summary>The report's form: <c>{"task": {"passed", "failed", "skipped", "pass_rate"}, …, "perplexity": x}</c>.</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject();
        foreach (var (kind, s) in Kinds.OrderBy(k => k.Key))
            o[Name(kind)] = new JsonObject { ["passed"] = s.Passed, ["failed"] = s.Failed, ["skipped"] = s.Skipped, ["pass_rate"] = s.PassRate };
        o["perplexity"] = Perplexity is double p && double.IsFinite(p) ? p : null; // JSON has no NaN; the gate fails such an adapter
        o["perplexity_tokens"] = PerplexityTokens;
        return o;
    }

    /// <summary>The kind's name in suites and reports.</summary>
    public static string Name(CaseKind kind) => kind.ToString().ToLowerInvariant();
}
