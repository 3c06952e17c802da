using System.Text.Json;
using LoraKit.IO;
using LoraKit.Tokenization;

namespace LoraKit.Evaluation;

/// <summary>
/// One suite line → one <see cref="EvalCase"/>, or a <see cref="SuiteException"/> naming the line and the field. Strict on
/// purpose: a misspelt field ("expected", "max_token") would otherwise be ignored and the case silently scored on
/// defaults, so unknown fields and kinds are errors, as are settings that cannot apply (max_tokens on a choices case).
/// </summary>
internal static class CaseParser
{
    /// <summary>Where a line is: the source as the caller named it, the 1-based line, and the case's <see cref="EvalCase.Where"/>.</summary>
    public readonly record struct Place(string Source, int Line, string Where);

    static readonly string[] CaseFields = ["id", "kind", "prompt", "messages", "text", "expect", "max_tokens", "temperature", "top_p", "seed"];
    static readonly string[] GenerationFields = ["max_tokens", "temperature", "top_p", "seed"];
    // The roles a chat template knows (as training data accepts them, JsonlDataset).
    static readonly string[] Roles = ["system", "user", "assistant", "tool"];

    public const int MaxIdLength = 200;
    public const int MaxTokensLimit = 4096;
    public const int MaxChoices = 64;
    /// <summary>Longer patterns are refused before compiling: a suite's regex is a short check, not a program.</summary>
    public const int MaxRegexLength = 4096;

    public static EvalCase Parse(string text, Place at, JsonDocumentOptions options)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(text, options); }
        catch (JsonException e) { throw new SuiteException($"{at.Source}:{at.Line}: not valid JSON ({JsonFiles.Describe(e).Replace("line 1, ", "")})"); }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new SuiteException($"{at.Source}:{at.Line}: a case must be a JSON object, got {JsonFiles.KindOf(root)}");
            try { return Case(root, at); }
            // GetString on an escaped lone surrogate ("\ud800") is the one way a parsed document still refuses a value.
            catch (InvalidOperationException e) { throw new SuiteException($"{at.Source}:{at.Line}: a string is not valid text ({e.Message.Split('.')[0]})"); }
        }
    }

    static EvalCase Case(JsonElement e, Place at)
    {
        Unknown(e, CaseFields, "", at, "fields of a case");
        string id = String(e, "id", at, required: true)!;
        if (id.Length > MaxIdLength) throw Fail(at, "id", $"{id.Length} characters, more than {MaxIdLength}");
        if (id.Any(char.IsControl)) throw Fail(at, "id", "contains a control character (ids appear in reports and logs)");
        var kind = Kind(e, at);

        var inputs = new[] { "prompt", "messages", "text" }.Where(f => e.TryGetProperty(f, out _)).ToList();
        if (inputs.Count != 1)
            throw Fail(at, inputs.Count == 0 ? "prompt" : inputs[1], inputs.Count == 0
                ? "a case needs exactly one of 'prompt', 'messages' or 'text'"
                : $"give only one of 'prompt', 'messages' or 'text', not '{inputs[0]}' and '{inputs[1]}'");
        string input = inputs[0];

        if (input == "text")
        {
            // A perplexity case: scored by mean next-token NLL of the text itself; nothing is generated or checked.
            foreach (var f in GenerationFields.Prepend("expect"))
                if (e.TryGetProperty(f, out _)) throw Fail(at, f, "a perplexity case ('text') has no expectation and generates nothing; remove it");
            return new EvalCase { Id = id, Kind = kind, Text = String(e, "text", at, required: true), Where = at.Where };
        }

        string? prompt = input == "prompt" ? String(e, "prompt", at, required: true) : null;
        var messages = input == "messages" ? Messages(e.GetProperty("messages"), at) : null;
        if (!e.TryGetProperty("expect", out var ex)) throw Fail(at, "expect", $"missing; a '{input}' case needs an expectation (equals, contains, not_contains, regex, choices, label, json or rubric)");
        var expect = ExpectationParser.Parse(ex, at);
        var c = new EvalCase { Id = id, Kind = kind, Prompt = prompt, Messages = messages, Expect = expect, Where = at.Where };
        if (!c.IsGenerated)
            foreach (var f in GenerationFields)
                if (e.TryGetProperty(f, out _)) throw Fail(at, f, $"a {(expect is ChoicesExpectation ? "choices" : "label")} case is scored without generating; remove it");
        return c with
        {
            MaxTokens = Integer(e, "max_tokens", at, 1, MaxTokensLimit) is long m ? (int)m : EvalCase.DefaultMaxTokens,
            Temperature = Number(e, "temperature", at, 0, 100, minExclusive: false) ?? 0,
            TopP = Number(e, "top_p", at, 0, 1, minExclusive: true) ?? 1.0,
            Seed = Integer(e, "seed", at, long.MinValue, long.MaxValue),
        };
    }

    static CaseKind Kind(JsonElement e, Place at) => String(e, "kind", at, required: true) switch
    {
        "task" => CaseKind.Task,
        "capability" => CaseKind.Capability,
        "safety" => CaseKind.Safety,
        var k => throw Fail(at, "kind", $"unknown kind {Show(k!)}; expected task, capability or safety"),
    };

    static List<ChatTurn> Messages(JsonElement v, Place at)
    {
        if (v.ValueKind != JsonValueKind.Array || v.GetArrayLength() == 0)
            throw Fail(at, "messages", $"must be a non-empty array of {{\"role\", \"content\"}} objects, got {Describe(v)}");
        var turns = new List<ChatTurn>();
        int i = 0;
        foreach (var m in v.EnumerateArray())
        {
            string f = $"messages[{i++}]";
            if (m.ValueKind != JsonValueKind.Object) throw Fail(at, f, $"must be a {{\"role\", \"content\"}} object, got {JsonFiles.KindOf(m)}");
            Unknown(m, ["role", "content"], f + ".", at, "fields of a message");
            string role = String(m, "role", at, required: true, prefix: f + ".")!;
            if (!Roles.Contains(role)) throw Fail(at, f + ".role", $"unknown role {Show(role)}; expected system, user, assistant or tool");
            turns.Add(new ChatTurn(role, String(m, "content", at, required: true, allowEmpty: true, prefix: f + ".")!));
        }
        // The model answers after the last turn (the template's generation prompt adds its header), so the last turn
        // is what it answers: the user's or a tool's, never its own or a bare system prompt.
        if (turns[^1].Role is "assistant" or "system")
            throw Fail(at, $"messages[{turns.Count - 1}].role", $"the last message is the {turns[^1].Role}'s; end with the user's (or a tool's) turn, which the model answers");
        return turns;
    }

    // ---- field readers, shared with Expectations ----

    internal static SuiteException Fail(Place at, string field, string problem) => new($"{at.Source}:{at.Line}: field '{field}': {problem}");

    internal static void Unknown(JsonElement e, string[] known, string prefix, Place at, string what)
    {
        foreach (var p in e.EnumerateObject())
            if (!known.Contains(p.Name))
                throw Fail(at, prefix + Clip(p.Name), $"unknown field; the {what} are {string.Join(", ", known)}");
    }

    internal static string? String(JsonElement e, string name, Place at, bool required = false, bool allowEmpty = false, string prefix = "")
    {
        if (!e.TryGetProperty(name, out var v))
            return required ? throw Fail(at, prefix + name, "missing") : null;
        if (v.ValueKind != JsonValueKind.String) throw Fail(at, prefix + name, $"must be a string, got {Describe(v)}");
        string s = Text(v, prefix + name, at);
        if (!allowEmpty && s.Trim().Length == 0) throw Fail(at, prefix + name, "is empty");
        return s;
    }

    /// <summary>A JSON string's value; an escaped unpaired surrogate ("\ud800") is the one string a parsed line still refuses.</summary>
    internal static string Text(JsonElement v, string field, Place at)
    {
        try { return v.GetString()!; }
        catch (InvalidOperationException) { throw Fail(at, field, "not valid text: it escapes half of a surrogate pair (\\ud800-\\udfff alone)"); }
    }

    static long? Integer(JsonElement e, string name, Place at, long min, long max)
    {
        if (!e.TryGetProperty(name, out var v)) return null;
        string range = min == long.MinValue ? "a 64-bit integer" : $"an integer from {min} to {max}";
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out long n) || n < min || n > max)
            throw Fail(at, name, $"must be {range}, got {Describe(v)}");
        return n;
    }

    static double? Number(JsonElement e, string name, Place at, double min, double max, bool minExclusive)
    {
        if (!e.TryGetProperty(name, out var v)) return null;
        string range = $"a number {(minExclusive ? "above" : "from")} {min} {(minExclusive ? "up " : "")}to {max}";
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetDouble(out double d) || !double.IsFinite(d)
            || d > max || d < min || (minExclusive && d == min))
            throw Fail(at, name, $"must be {range}, got {Describe(v)}");
        return d;
    }

    /// <summary>A value for a message: its JSON kind, and the value itself when it is a short scalar.</summary>
    internal static string Describe(JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.Number or JsonValueKind.True or JsonValueKind.False => $"{JsonFiles.KindOf(v)} ({Clip(v.GetRawText())})",
        JsonValueKind.Array when v.GetArrayLength() == 0 => "an empty array",
        _ => JsonFiles.KindOf(v),
    };

    /// <summary>A value quoted for a message: JSON-escaped (control characters stay on the line), other text as written.</summary>
    internal static string Show(string s) => JsonSerializer.Serialize(Clip(s), Quoting);
    static readonly JsonSerializerOptions Quoting = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
    static string Clip(string s) => s.Length > 60 ? s[..60] + "…" : s;
}
