using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraKit.Evaluation;

/// <summary>A check's verdict on one output: passed, and in plain words why not.</summary>
public sealed record Verdict(bool Passed, string? Reason = null)
{
    public static readonly Verdict Pass = new(true);
    public static Verdict Fail(string reason) => new(false, reason);
}

/// <summary>
/// What a case expects (the suite line's <c>expect</c> object). Text expectations check a generated output; choices
/// are scored by log-likelihood and labels by a classification adapter (the runner gives them the picked choice's
/// index or label as the "output"); a rubric needs a judge (an <c>IChatClient</c>).
/// </summary>
public abstract record Expectation
{
    /// <summary>Checks a generated (or picked) output; outputs are compared after trimming surrounding whitespace.</summary>
    public abstract Verdict Check(string output);
    /// <summary>The expectation as its suite JSON (for reports).</summary>
    public abstract string Describe();
}

/// <summary><c>{"equals": s}</c>: the output, trimmed, equals s (ordinal).</summary>
public sealed record EqualsExpectation(string Value) : Expectation
{
    public override Verdict Check(string output) =>
        output.Trim() == Value.Trim() ? Verdict.Pass : Verdict.Fail($"expected {Quote(Value)}");
    public override string Describe() => $"equals {Quote(Value)}";
    internal static string Quote(string s) => JsonSerializer.Serialize(s.Length > 80 ? s[..80] + "…" : s);
}

/// <summary><c>{"contains": s | [s...]}</c>: the output contains every string (ordinal).</summary>
public sealed record ContainsExpectation(IReadOnlyList<string> Values) : Expectation
{
    public override Verdict Check(string output)
    {
        var missing = Values.Where(v => !output.Contains(v, StringComparison.Ordinal)).ToList();
        return missing.Count == 0 ? Verdict.Pass : Verdict.Fail($"missing {string.Join(", ", missing.Select(EqualsExpectation.Quote))}");
    }
    public override string Describe() => $"contains {string.Join(", ", Values.Select(EqualsExpectation.Quote))}";
}

/// <summary><c>{"not_contains": [s...]}</c>: the output contains none of the strings (ordinal, case-insensitive).</summary>
public sealed record NotContainsExpectation(IReadOnlyList<string> Values) : Expectation
{
    public override Verdict Check(string output)
    {
        var found = Values.Where(v => output.Contains(v, StringComparison.OrdinalIgnoreCase)).ToList();
        return found.Count == 0 ? Verdict.Pass : Verdict.Fail($"contains {string.Join(", ", found.Select(EqualsExpectation.Quote))}");
    }
    public override string Describe() => $"contains none of {string.Join(", ", Values.Select(EqualsExpectation.Quote))}";
}

/// <summary>
/// <c>{"regex": r}</c>: the .NET regex matches somewhere in the output. Suites are untrusted input: the pattern is
/// compiled with a match timeout, and a match that runs out of time counts as a failure, never a hang.
/// </summary>
public sealed record RegexExpectation(string Pattern, Regex Regex) : Expectation
{
    public static readonly TimeSpan MatchTimeout = TimeSpan.FromSeconds(1);
    public override Verdict Check(string output)
    {
        try { return Regex.IsMatch(output) ? Verdict.Pass : Verdict.Fail($"no match for /{Pattern}/"); }
        catch (RegexMatchTimeoutException) { return Verdict.Fail($"/{Pattern}/ ran out of time ({MatchTimeout.TotalSeconds:0} s)"); }
    }
    public override string Describe() => $"matches /{Pattern}/";
}

/// <summary><c>{"json": true}</c>: the output, trimmed (a ```json fence around it allowed), parses as JSON.</summary>
public sealed record JsonExpectation : Expectation
{
    public override Verdict Check(string output)
    {
        var s = output.Trim();
        if (s.StartsWith("```", StringComparison.Ordinal))
        {
            int nl = s.IndexOf('\n');
            s = nl < 0 ? "" : s[(nl + 1)..];
            if (s.TrimEnd().EndsWith("```", StringComparison.Ordinal)) s = s.TrimEnd()[..^3];
        }
        try
        {
            using var _ = JsonDocument.Parse(s, new JsonDocumentOptions { MaxDepth = 64 });
            return Verdict.Pass;
        }
        catch (JsonException e) { return Verdict.Fail($"not JSON ({e.Message.Split('.')[0]})"); }
        // A lone surrogate (possible in a judge's or client's text, never in valid UTF-8) cannot even be transcoded.
        catch (ArgumentException) { return Verdict.Fail("not JSON (the text holds an unpaired surrogate)"); }
    }
    public override string Describe() => "parses as JSON";
}

/// <summary>
/// <c>{"choices": [s...], "answer": i}</c>: scored without generation, by the summed log-likelihood of each choice
/// after the prompt (lm-evaluation-harness' <c>acc</c>); passes when the answer's is the highest. The runner checks
/// the picked index, as text.
/// </summary>
public sealed record ChoicesExpectation(IReadOnlyList<string> Choices, int Answer) : Expectation
{
    public override Verdict Check(string output) =>
        output == Answer.ToString(System.Globalization.CultureInfo.InvariantCulture) ? Verdict.Pass
            : Verdict.Fail($"picked {Pick(output)}, expected {EqualsExpectation.Quote(Choices[Answer])}");
    string Pick(string output) => int.TryParse(output, out int i) && i >= 0 && i < Choices.Count ? EqualsExpectation.Quote(Choices[i]) : output;
    public override string Describe() => $"choice {EqualsExpectation.Quote(Choices[Answer])} of {Choices.Count}";
}

/// <summary><c>{"label": s}</c>: a classification adapter predicts this label (the runner checks the predicted label).</summary>
public sealed record LabelExpectation(string Label) : Expectation
{
    public override Verdict Check(string output) =>
        output == Label ? Verdict.Pass : Verdict.Fail($"predicted {EqualsExpectation.Quote(output)}, expected {EqualsExpectation.Quote(Label)}");
    public override string Describe() => $"label {EqualsExpectation.Quote(Label)}";
}

/// <summary>
/// <c>{"rubric": "..."}</c>: an LLM judge (any <c>IChatClient</c>) decides whether the output meets the rubric. Without a
/// judge the case cannot be scored and is reported as skipped.
/// </summary>
public sealed record RubricExpectation(string Rubric) : Expectation
{
    public override Verdict Check(string output) => throw new InvalidOperationException("a rubric case is judged by a chat client (RubricJudge), not checked locally");
    public override string Describe() => $"rubric {EqualsExpectation.Quote(Rubric)}";
}
