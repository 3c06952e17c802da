using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.IO;

/// <summary>
/// Reading the JSON files of a model directory (config.json, tokenizer.json, ...) with errors a person can act on:
/// the file, the line and column, and what is wrong — never System.Text.Json's "Path: $ | LineNumber: 0" wording.
/// A key given twice in one object is an error (the file is ambiguous: Python keeps the last, other readers the first).
/// </summary>
internal static class JsonFiles
{
    public static readonly JsonDocumentOptions Options = new() { AllowDuplicateProperties = false, MaxDepth = 128 };

    /// <summary>Parses a whole file; any read or syntax problem is a <see cref="LoraKitException"/> naming the file.</summary>
    public static JsonDocument Parse(string path)
    {
        string text = ReadText(path);
        try { return JsonDocument.Parse(text, Options); }
        catch (JsonException e) { throw new LoraKitException($"{path}: not valid JSON ({Describe(e)})"); }
    }

    /// <summary>Parses a whole file into a mutable node tree (same errors as <see cref="Parse"/>).</summary>
    public static JsonNode? ParseNode(string path)
    {
        string text = ReadText(path);
        try { return JsonNode.Parse(text, null, Options); }
        catch (JsonException e) { throw new LoraKitException($"{path}: not valid JSON ({Describe(e)})"); }
    }

    /// <summary>The most a JSON file of a model or run is read (tokenizer.json of a 256k vocabulary is ~35 MB).</summary>
    public const long MaxBytes = 128L << 20;

    /// <summary>The file as text (UTF-8, BOM dropped), bounded by <see cref="MaxBytes"/>; read problems name the file.</summary>
    public static string ReadText(string path)
    {
        var bytes = FileProblem.ReadAllBytes(path, MaxBytes);
        return new System.Text.UTF8Encoding(false, false).GetString(bytes).TrimStart('\uFEFF');
    }

    /// <summary>"line 3, column 7: duplicate key 'x'" from a JsonException, without the library's path boilerplate.</summary>
    public static string Describe(JsonException e)
    {
        // .NET words a repeated key "Duplicate property 'x' encountered during deserialization" or similar.
        return e.LineNumber is long line ? $"line {line + 1}, column {(e.BytePositionInLine ?? 0) + 1}: {Reason(e)}" : Reason(e);
    }

    /// <summary>
    /// What System.Text.Json says is wrong, as one line without its " Path: $.x | LineNumber: 0 | …" tail (internal
    /// coordinates; callers say where in the user's terms).
    /// </summary>
    public static string Reason(JsonException e)
    {
        string m = e.Message;
        int cut = m.IndexOf(" Path: ", StringComparison.Ordinal);
        if (cut < 0) cut = m.IndexOf(" LineNumber:", StringComparison.Ordinal);
        if (cut >= 0) m = m[..cut];
        return m.Replace("\r", " ").Replace("\n", " ").TrimEnd('.', ' ');
    }

    /// <summary>JSON's name for a node's kind, for "must be an integer, got a string" messages.</summary>
    public static string KindOf(JsonNode? n) => n switch
    {
        null => "null",
        JsonObject => "an object",
        JsonArray => "an array",
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => "a string",
            JsonValueKind.Number => "a number",
            JsonValueKind.True or JsonValueKind.False => "a boolean",
            JsonValueKind.Null => "null",
            _ => "a value",
        },
        _ => "a value",
    };

    public static string KindOf(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "an array",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        _ => "nothing",
    };
}
