using System.Globalization;
using System.Text;

namespace LoraKit.Templating;

/// <summary>Jinja's undefined value: empty when printed or iterated, false when tested.</summary>
internal sealed class Undefined
{
    public static readonly Undefined Instance = new();
    Undefined() { }
}

/// <summary>A <c>namespace(...)</c> object: the one mutable value templates can assign attributes on.</summary>
internal sealed class Namespace : Dictionary<string, object?>;

/// <summary>A callable value (global function, macro, bound method).</summary>
internal delegate object? Callable(List<object?> args, Dictionary<string, object?> kwargs);

/// <summary>Python semantics for the values templates see: truthiness, str(), repr(), equality, ordering, JSON.</summary>
internal static class PyValues
{
    public static bool Truthy(object? v) => v switch
    {
        null or Undefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        List<object?> l => l.Count > 0,
        Dictionary<string, object?> d => d.Count > 0,
        _ => true,
    };

    public static string Str(object? v) => v switch
    {
        null => "None",
        Undefined => "",
        string s => s,
        bool b => b ? "True" : "False",
        long l => l.ToString(CultureInfo.InvariantCulture),
        double d => FloatRepr(d),
        _ => Repr(v),
    };

    public static string Repr(object? v)
    {
        if (v is not (List<object?> or Dictionary<string, object?>)) return ReprScalar(v);
        var sb = new StringBuilder();
        WriteRepr(sb, v, 0);
        return sb.ToString();
    }

    static string ReprScalar(object? v) => v switch
    {
        string s => StrRepr(s),
        Callable => "<function>",
        _ => Str(v),
    };

    // Containers are written into one builder with the size and nesting bounds checked as it grows: a list holding
    // the same long string a million times, or a namespace that contains itself, is an error, not gigabytes.
    static void WriteRepr(StringBuilder sb, object? v, int depth)
    {
        if (depth > RenderLimits.MaxDepth) throw new TemplateException($"value nests deeper than {RenderLimits.MaxDepth} levels (does it contain itself?)");
        RenderLimits.CheckChars(sb.Length, 0, "a value's text");
        switch (v)
        {
            case List<object?> l:
                sb.Append('[');
                for (int i = 0; i < l.Count; i++)
                {
                    if (i > 0) sb.Append(", ");
                    WriteRepr(sb, l[i], depth + 1);
                }
                sb.Append(']');
                break;
            case Namespace n:
                sb.Append("<Namespace ");
                int k = 0;
                foreach (var kv in n)
                {
                    if (k++ > 0) sb.Append(", ");
                    sb.Append(kv.Key).Append('=');
                    WriteRepr(sb, kv.Value, depth + 1);
                }
                sb.Append('>');
                break;
            case Dictionary<string, object?> d:
                sb.Append('{');
                int j = 0;
                foreach (var kv in d)
                {
                    if (j++ > 0) sb.Append(", ");
                    sb.Append(StrRepr(kv.Key)).Append(": ");
                    WriteRepr(sb, kv.Value, depth + 1);
                }
                sb.Append('}');
                break;
            default:
                var text = ReprScalar(v);
                RenderLimits.CheckChars((long)sb.Length + text.Length, 0, "a value's text");
                sb.Append(text);
                break;
        }
    }

    static string StrRepr(string s)
    {
        char q = s.Contains('\'') && !s.Contains('"') ? '"' : '\'';
        var sb = new StringBuilder().Append(q);
        foreach (var c in s)
        {
            switch (c)
            {
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                default:
                    if (c == q) sb.Append('\\').Append(c);
                    else if (c < 0x20 || c == 0x7f) sb.Append($"\\x{(int)c:x2}");
                    else sb.Append(c);
                    break;
            }
        }
        return sb.Append(q).ToString();
    }

    public static string FloatRepr(double d)
    {
        if (double.IsNaN(d)) return "nan";
        if (double.IsInfinity(d)) return d > 0 ? "inf" : "-inf";
        if (d == Math.Floor(d) && Math.Abs(d) < 1e16) return d.ToString("F1", CultureInfo.InvariantCulture);
        var r = d.ToString("R", CultureInfo.InvariantCulture);
        if (r.Contains('E'))
        {
            // Python writes 1e-05 / 1e+16: lower-case e, explicit sign, at least two exponent digits.
            var parts = r.Split('E');
            int exp = int.Parse(parts[1], CultureInfo.InvariantCulture);
            return parts[0] + "e" + (exp < 0 ? "-" : "+") + Math.Abs(exp).ToString("00", CultureInfo.InvariantCulture);
        }
        return r;
    }

    public static bool Eq(object? a, object? b) => Eq(a, b, 0);

    static bool Eq(object? a, object? b, int depth)
    {
        if (depth > RenderLimits.MaxDepth) throw new TemplateException($"values nest deeper than {RenderLimits.MaxDepth} levels (does one contain itself?)");
        RenderLimits.Charge(1);
        return EqCore(a, b, depth);
    }

    static bool EqCore(object? a, object? b, int depth) => (a, b) switch
    {
        (null, null) => true,
        (Undefined, Undefined) => true,
        (bool x, bool y) => x == y,
        (long x, long y) => x == y,
        (long x, double y) => x == y,
        (double x, long y) => x == y,
        (double x, double y) => x == y,
        (string x, string y) => x == y,
        (List<object?> x, List<object?> y) => x.Count == y.Count && x.Zip(y).All(p => Eq(p.First, p.Second, depth + 1)),
        (Dictionary<string, object?> x, Dictionary<string, object?> y) =>
            x.Count == y.Count && x.All(kv => y.TryGetValue(kv.Key, out var o) && Eq(kv.Value, o, depth + 1)),
        _ => ReferenceEquals(a, b),
    };

    public static int Compare(object? a, object? b) => (a, b) switch
    {
        (long x, long y) => x.CompareTo(y),
        (long or double, long or double) => ToDouble(a).CompareTo(ToDouble(b)),
        (string x, string y) => string.CompareOrdinal(x, y),
        (bool x, bool y) => x.CompareTo(y),
        _ => throw new TemplateException($"cannot compare {TypeName(a)} with {TypeName(b)}"),
    };

    public static double ToDouble(object? v) => v switch
    {
        long l => l,
        double d => d,
        bool b => b ? 1 : 0,
        _ => throw new TemplateException($"expected a number, got {TypeName(v)}"),
    };

    public static string TypeName(object? v) => v switch
    {
        null => "None",
        Undefined => "undefined",
        string => "str",
        bool => "bool",
        long => "int",
        double => "float",
        List<object?> => "list",
        Dictionary<string, object?> => "dict",
        _ => v.GetType().Name,
    };

    /// <summary>Python's json.dumps(v, ensure_ascii=False, indent=indent), as transformers' tojson filter calls it.</summary>
    public static string ToJson(object? v, int? indent = null)
    {
        var sb = new StringBuilder();
        WriteJson(sb, v, indent, 0);
        return sb.ToString();
    }

    static void WriteJson(StringBuilder sb, object? v, int? indent, int depth)
    {
        if (depth > RenderLimits.MaxDepth) throw new TemplateException($"value nests deeper than {RenderLimits.MaxDepth} levels (does it contain itself?)");
        RenderLimits.CheckChars(sb.Length, 0, "tojson's text");
        string itemSep = indent is null ? ", " : ",";
        switch (v)
        {
            case null or Undefined: sb.Append("null"); break;
            case bool b: sb.Append(b ? "true" : "false"); break;
            case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); break;
            case double d: sb.Append(double.IsNaN(d) ? "NaN" : double.IsInfinity(d) ? (d > 0 ? "Infinity" : "-Infinity") : FloatRepr(d)); break;
            case string s: RenderLimits.CheckChars((long)sb.Length + s.Length, 0, "tojson's text"); JsonString(sb, s); break;
            case List<object?> list:
                if (list.Count == 0) { sb.Append("[]"); break; }
                sb.Append('[');
                for (int i = 0; i < list.Count; i++)
                {
                    if (i > 0) sb.Append(itemSep);
                    NewLine(sb, indent, depth + 1);
                    WriteJson(sb, list[i], indent, depth + 1);
                }
                NewLine(sb, indent, depth);
                sb.Append(']');
                break;
            case Dictionary<string, object?> dict:
                if (dict.Count == 0) { sb.Append("{}"); break; }
                sb.Append('{');
                int k = 0;
                foreach (var (key, value) in dict)
                {
                    if (k++ > 0) sb.Append(itemSep);
                    NewLine(sb, indent, depth + 1);
                    JsonString(sb, key);
                    sb.Append(": ");
                    WriteJson(sb, value, indent, depth + 1);
                }
                NewLine(sb, indent, depth);
                sb.Append('}');
                break;
            default: throw new TemplateException($"cannot serialise {TypeName(v)} to JSON");
        }
    }

    static void NewLine(StringBuilder sb, int? indent, int depth)
    {
        if (indent is not int n) return;
        RenderLimits.CheckChars(sb.Length + (long)n * depth, 0, "tojson's text");
        sb.Append('\n').Append(' ', n * depth);
    }

    static void JsonString(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (var c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20) sb.Append($"\\u{(int)c:x4}");
                    else sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }

    /// <summary>Converts parsed JSON (messages, tools) into template values.</summary>
    public static object? FromJson(System.Text.Json.JsonElement e) => e.ValueKind switch
    {
        System.Text.Json.JsonValueKind.Object => e.EnumerateObject().ToDictionary(p => p.Name, p => FromJson(p.Value)),
        System.Text.Json.JsonValueKind.Array => e.EnumerateArray().Select(FromJson).ToList(),
        System.Text.Json.JsonValueKind.String => e.GetString(),
        System.Text.Json.JsonValueKind.Number => e.TryGetInt64(out var l) ? l : e.GetDouble(),
        System.Text.Json.JsonValueKind.True => true,
        System.Text.Json.JsonValueKind.False => false,
        _ => null,
    };
}
