using System.Text;
using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>tokenizer.json "normalizer" section: string → string, applied to each piece between added tokens.</summary>
internal static class Normalizers
{
    public static Func<string, string> Build(JsonElement n)
    {
        if (n.ValueKind is JsonValueKind.Null or JsonValueKind.Undefined) return s => s;
        string type = n.Str("type", "normalizer");
        switch (type)
        {
            case "Sequence":
                var parts = n.Arr("normalizers", "normalizer").Select(Build).ToList();
                return s => parts.Aggregate(s, (acc, f) => f(acc));
            case "NFC": return s => s.Normalize(NormalizationForm.FormC);
            case "NFD": return s => s.Normalize(NormalizationForm.FormD);
            case "NFKC": return s => s.Normalize(NormalizationForm.FormKC);
            case "NFKD": return s => s.Normalize(NormalizationForm.FormKD);
            case "Lowercase": return s => s.ToLowerInvariant();
            case "Prepend":
                string prefix = n.Str("prepend", "normalizer");
                return s => s.Length == 0 ? s : prefix + s;
            case "Replace":
                var (pattern, isRegex) = Pattern(n.Req("pattern", "normalizer"), "normalizer.pattern");
                string content = n.Str("content", "normalizer");
                if (isRegex)
                {
                    var re = PreTokenizers.Compile(pattern, "normalizer", System.Text.RegularExpressions.RegexOptions.None);
                    return s => re.Replace(s, content);
                }
                return s => s.Replace(pattern, content, StringComparison.Ordinal);
            case "Strip":
                bool left = n.Bool("strip_left", "normalizer", false), right = n.Bool("strip_right", "normalizer", false);
                return s => left && right ? s.Trim() : left ? s.TrimStart() : right ? s.TrimEnd() : s;
            default:
                throw new NotSupportedException($"unsupported normalizer type '{type}'");
        }
    }

    /// <summary>A pattern object: {"String": "..."} or {"Regex": "..."}.</summary>
    public static (string pattern, bool isRegex) Pattern(JsonElement p, string where) =>
        p.ValueKind != JsonValueKind.Object ? throw new TokenizerFormatException($"'{where}' must be an object {{\"Regex\": ...}} or {{\"String\": ...}}, got {LoraKit.IO.JsonFiles.KindOf(p)}")
        : p.TryGetProperty("Regex", out var r) ? (r.AsStr(where + ".Regex"), true) : (p.Str("String", where), false);
}
