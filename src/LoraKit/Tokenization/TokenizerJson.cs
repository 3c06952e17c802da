using System.Text.Json;
using LoraKit.IO;

namespace LoraKit.Tokenization;

/// <summary>A field of tokenizer.json that is missing or of the wrong type; <see cref="Tokenizer.Load"/> adds the file's path.</summary>
public sealed class TokenizerFormatException(string problem) : LoraKitException(problem);

/// <summary>Typed access to tokenizer.json's sections, naming the field (<c>where.name</c>) when it is missing or wrongly typed.</summary>
static class TokenizerJson
{
    public static JsonElement Req(this JsonElement e, string name, string where)
    {
        if (e.ValueKind != JsonValueKind.Object) throw new TokenizerFormatException($"'{(where.Length == 0 ? "the file" : where)}' must be an object, got {JsonFiles.KindOf(e)}");
        return e.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null ? v
            : throw new TokenizerFormatException($"'{Join(where, name)}' is missing");
    }

    /// <summary>The property, or default (Undefined) when absent or null.</summary>
    public static JsonElement Opt(this JsonElement e, string name, string where)
    {
        if (e.ValueKind != JsonValueKind.Object) throw new TokenizerFormatException($"'{(where.Length == 0 ? "the file" : where)}' must be an object, got {JsonFiles.KindOf(e)}");
        return e.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null ? v : default;
    }

    /// <summary>"where.name", or just "name" for a top-level field (where is "").</summary>
    static string Join(string where, string name) => where.Length == 0 ? name : $"{where}.{name}";

    public static string Str(this JsonElement e, string name, string where) => AsStr(e.Req(name, where), Join(where, name));

    public static string? OptStr(this JsonElement e, string name, string where) =>
        e.Opt(name, where) is { ValueKind: not JsonValueKind.Undefined } v ? AsStr(v, Join(where, name)) : null;

    public static string AsStr(this JsonElement v, string field) =>
        v.ValueKind == JsonValueKind.String ? v.GetString()! : throw new TokenizerFormatException($"'{field}' must be a string, got {JsonFiles.KindOf(v)}");

    public static int Int(this JsonElement e, string name, string where) => AsInt(e.Req(name, where), Join(where, name));

    public static int AsInt(this JsonElement v, string field) =>
        v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out int i) ? i
            : throw new TokenizerFormatException($"'{field}' must be an integer, got {JsonFiles.KindOf(v)}" + (v.ValueKind == JsonValueKind.Number ? $" ({v.GetRawText()})" : ""));

    public static bool Bool(this JsonElement e, string name, string where, bool dflt)
    {
        var v = e.Opt(name, where);
        return v.ValueKind switch
        {
            JsonValueKind.Undefined => dflt,
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw new TokenizerFormatException($"'{Join(where, name)}' must be true or false, got {JsonFiles.KindOf(v)}"),
        };
    }

    public static IEnumerable<JsonElement> Arr(this JsonElement e, string name, string where)
    {
        var v = e.Req(name, where);
        return v.ValueKind == JsonValueKind.Array ? v.EnumerateArray()
            : throw new TokenizerFormatException($"'{Join(where, name)}' must be a list, got {JsonFiles.KindOf(v)}");
    }

    public static IEnumerable<JsonProperty> Obj(this JsonElement e, string name, string where)
    {
        var v = e.Req(name, where);
        return v.ValueKind == JsonValueKind.Object ? v.EnumerateObject()
            : throw new TokenizerFormatException($"'{Join(where, name)}' must be an object, got {JsonFiles.KindOf(v)}");
    }
}
