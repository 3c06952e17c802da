using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.IO;

namespace LoraKit.Models;

/// <summary>
/// Typed, error-naming access to the fields of a JSON object in config.json. Null (or absent) means "not set"; anything
/// of the wrong type is a <see cref="ModelConfigException"/> whose one-line message names the file and the field (with
/// <c>prefix</c>, e.g. "rope_parameters.", for nested objects).
/// </summary>
internal sealed class ConfigReader(JsonObject o, string source, string prefix = "")
{
    public string Source => source;
    public string Prefix => prefix;
    public JsonObject Object => o;

    /// <summary>Whether the key is written with a JSON null (transformers reads that as None, which can differ from a default).</summary>
    public bool IsExplicitNull(string key) => o.TryGetPropertyValue(key, out var n) && (n is null || n.GetValueKind() == JsonValueKind.Null);

    public bool Has(string key) => o.TryGetPropertyValue(key, out var n) && n is not null && n.GetValueKind() != JsonValueKind.Null;

    JsonValue? Val(string key, string expected)
    {
        var n = o[key];
        if (n is null) return null;
        if (n is JsonValue v && v.GetValueKind() != JsonValueKind.Null) return v;
        if (n is JsonValue) return null;
        throw Wrong(key, expected, n);
    }

    public ModelConfigException Wrong(string key, string expected, JsonNode? n) =>
        new(source, $"field '{prefix}{key}' must be {expected}, got {JsonFiles.KindOf(n)}" + (n is JsonValue ? $" ({n.ToJsonString()})" : ""));

    public ModelConfigException Error(string problem) => new(source, problem);

    public string? Str(string key)
    {
        var v = Val(key, "a string");
        if (v == null) return null;
        return v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : throw Wrong(key, "a string", v);
    }

    public int Int(string key) => OptInt(key) ?? throw new ModelConfigException(source, $"missing required field '{prefix}{key}'");

    public double Double(string key) => OptDouble(key) ?? throw new ModelConfigException(source, $"missing required field '{prefix}{key}'");

    public int? OptInt(string key)
    {
        var v = Val(key, "an integer");
        if (v == null) return null;
        return ToInt(v, prefix + key, source) ?? throw Wrong(key, "an integer", v);
    }

    public double? OptDouble(string key)
    {
        var v = Val(key, "a number");
        if (v == null) return null;
        return v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<double>(out var d) ? d : throw Wrong(key, "a number", v);
    }

    /// <summary>A number that must be finite and positive when set.</summary>
    public double? OptPositive(string key)
    {
        var d = OptDouble(key);
        if (d is double x && (!(x > 0) || double.IsInfinity(x)))
            throw new ModelConfigException(source, $"field '{prefix}{key}' must be a positive number, got {x}");
        return d;
    }

    public bool? OptBool(string key)
    {
        var v = Val(key, "true or false");
        if (v == null) return null;
        return v.GetValueKind() is JsonValueKind.True or JsonValueKind.False ? v.GetValue<bool>() : throw Wrong(key, "true or false", v);
    }

    /// <summary>A list of finite numbers (longrope's factors), or null when absent.</summary>
    public double[]? OptNumbers(string key)
    {
        var n = o[key];
        if (n is null || (n is JsonValue nv && nv.GetValueKind() == JsonValueKind.Null)) return null;
        if (n is not JsonArray a) throw Wrong(key, "a list of numbers", n);
        var result = new double[a.Count];
        for (int i = 0; i < a.Count; i++)
            result[i] = a[i] is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<double>(out var d) && double.IsFinite(d)
                ? d : throw new ModelConfigException(source, $"field '{prefix}{key}' must list finite numbers, got {JsonFiles.KindOf(a[i])} at index {i}");
        return result;
    }

    /// <summary>A list of strings (layer_types), or null when absent.</summary>
    public string[]? OptStrings(string key)
    {
        var n = o[key];
        if (n is null || (n is JsonValue nv && nv.GetValueKind() == JsonValueKind.Null)) return null;
        if (n is not JsonArray a) throw Wrong(key, "a list of strings", n);
        var result = new string[a.Count];
        for (int i = 0; i < a.Count; i++)
            result[i] = a[i] is JsonValue v && v.TryGetValue<string>(out var s) ? s
                : throw new ModelConfigException(source, $"field '{prefix}{key}' must list strings, got {JsonFiles.KindOf(a[i])} at index {i}");
        return result;
    }

    /// <summary>A nested object (or null when absent or null), read with this reader's file and a longer prefix.</summary>
    public ConfigReader? OptObject(string key)
    {
        var n = o[key];
        if (n is null || (n is JsonValue nv && nv.GetValueKind() == JsonValueKind.Null)) return null;
        return n is JsonObject obj ? new ConfigReader(obj, source, prefix + key + ".")
            : throw new ModelConfigException(source, $"field '{prefix}{key}' must be an object (or null), got {JsonFiles.KindOf(n)}");
    }

    public static int? ToInt(JsonNode? n, string key, string source)
    {
        if (n is not JsonValue v || v.GetValueKind() != JsonValueKind.Number) return null;
        if (v.TryGetValue<int>(out var i)) return i;
        if (v.TryGetValue<double>(out var d) && d == Math.Floor(d))
            return d is >= int.MinValue and <= int.MaxValue ? (int)d
                : throw new ModelConfigException(source, $"field '{key}' is {d}, too large for an integer");
        return null;
    }
}
