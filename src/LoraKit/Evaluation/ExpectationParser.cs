using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraKit.Evaluation;

/// <summary>
/// A case's <c>expect</c> object → its <see cref="Expectation"/>: exactly one check (choices with its answer), each value
/// validated; regexes are compiled here, with <see cref="RegexExpectation.MatchTimeout"/>, so a bad pattern names its line.
/// </summary>
internal static class ExpectationParser
{
    static readonly string[] Fields = ["equals", "contains", "not_contains", "regex", "choices", "answer", "label", "json", "rubric"];

    public static Expectation Parse(JsonElement ex, CaseParser.Place at)
    {
        if (ex.ValueKind != JsonValueKind.Object)
            throw CaseParser.Fail(at, "expect", $"must be an object such as {{\"contains\": \"Paris\"}}, got {CaseParser.Describe(ex)}");
        CaseParser.Unknown(ex, Fields, "expect.", at, "expectations");
        var given = ex.EnumerateObject().Select(p => p.Name).Where(n => n != "answer").ToList();
        bool answer = ex.TryGetProperty("answer", out var answerValue);
        if (given.Count == 0)
            throw CaseParser.Fail(at, answer ? "expect.choices" : "expect", answer ? "'answer' needs 'choices'" : "empty; give one of " + string.Join(", ", Fields.Where(f => f != "answer")));
        if (given.Count > 1)
            throw CaseParser.Fail(at, "expect." + given[1], $"give one expectation per case, not '{given[0]}' and '{given[1]}' (split the case in two)");
        string kind = given[0];
        if (answer && kind != "choices") throw CaseParser.Fail(at, "expect.answer", $"'answer' goes with 'choices', not '{kind}'");
        var v = ex.GetProperty(kind);
        string f = "expect." + kind;
        return kind switch
        {
            "equals" => new EqualsExpectation(NonEmpty(v, f, at)),
            "contains" => new ContainsExpectation(v.ValueKind == JsonValueKind.String ? [NonEmpty(v, f, at)] : Strings(v, f, at)),
            "not_contains" => new NotContainsExpectation(Strings(v, f, at)),
            "regex" => Regex(NonEmpty(v, f, at), f, at),
            "choices" => Choices(v, answer ? answerValue : null, at),
            "label" => new LabelExpectation(NonEmpty(v, f, at)),
            "json" => v.ValueKind == JsonValueKind.True ? new JsonExpectation()
                : throw CaseParser.Fail(at, f, $"must be true (the output parses as JSON), got {CaseParser.Describe(v)}"),
            _ => new RubricExpectation(NonEmpty(v, f, at)),
        };
    }

    static string NonEmpty(JsonElement v, string field, CaseParser.Place at)
    {
        if (v.ValueKind != JsonValueKind.String) throw CaseParser.Fail(at, field, $"must be a string, got {CaseParser.Describe(v)}");
        string s = CaseParser.Text(v, field, at);
        // Outputs are compared trimmed; a blank expectation would pass or fail everything.
        return s.Trim().Length > 0 ? s : throw CaseParser.Fail(at, field, "is empty");
    }

    static List<string> Strings(JsonElement v, string field, CaseParser.Place at)
    {
        if (v.ValueKind != JsonValueKind.Array || v.GetArrayLength() == 0)
            throw CaseParser.Fail(at, field, $"must be a non-empty array of strings, got {CaseParser.Describe(v)}");
        int i = 0;
        return v.EnumerateArray().Select(s => NonEmpty(s, $"{field}[{i++}]", at)).ToList();
    }

    static RegexExpectation Regex(string pattern, string field, CaseParser.Place at)
    {
        if (pattern.Length > CaseParser.MaxRegexLength) throw CaseParser.Fail(at, field, $"{pattern.Length:N0} characters, more than {CaseParser.MaxRegexLength:N0}");
        try { return new RegexExpectation(pattern, new Regex(pattern, RegexOptions.CultureInvariant, RegexExpectation.MatchTimeout)); }
        catch (RegexParseException e) { throw CaseParser.Fail(at, field, $"not a valid .NET regex: {Words(e.Error.ToString())} at offset {e.Offset}"); }
        catch (ArgumentException e) { throw CaseParser.Fail(at, field, $"not a valid .NET regex: {e.Message.Split('\n')[0]}"); }
    }

    /// <summary>"InsufficientClosingParentheses" → "insufficient closing parentheses".</summary>
    static string Words(string name) => System.Text.RegularExpressions.Regex.Replace(name, "(?<=[a-z])(?=[A-Z])", " ").ToLowerInvariant();

    static ChoicesExpectation Choices(JsonElement v, JsonElement? answer, CaseParser.Place at)
    {
        var choices = Strings(v, "expect.choices", at);
        if (choices.Count < 2) throw CaseParser.Fail(at, "expect.choices", "needs at least 2 choices");
        if (choices.Count > CaseParser.MaxChoices) throw CaseParser.Fail(at, "expect.choices", $"{choices.Count} choices, more than {CaseParser.MaxChoices}");
        // Two equal choices have equal likelihoods: the answer could never win outright.
        var dup = choices.GroupBy(c => c, StringComparer.Ordinal).FirstOrDefault(g => g.Count() > 1);
        if (dup is not null) throw CaseParser.Fail(at, "expect.choices", $"{CaseParser.Show(dup.Key)} is listed twice");
        if (answer is not JsonElement a) throw CaseParser.Fail(at, "expect.answer", "missing; give the index (from 0) of the right choice");
        if (a.ValueKind != JsonValueKind.Number || !a.TryGetInt32(out int i) || i < 0 || i >= choices.Count)
            throw CaseParser.Fail(at, "expect.answer", $"must be an index from 0 to {choices.Count - 1} into 'choices', got {CaseParser.Describe(a)}");
        return new ChoicesExpectation(choices, i);
    }
}
