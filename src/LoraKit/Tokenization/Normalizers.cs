using System.Text;
using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>tokenizer.json "normalizer" section: string → string, applied to each piece between added tokens.</summary>
public static class Normalizers
{
    public static Func<string, string> Build(JsonElement n)
    {
        if (n.ValueKind == JsonValueKind.Null) return s => s;
        string type = n.GetProperty("type").GetString()!;
        switch (type)
        {
            case "Sequence":
                var parts = n.GetProperty("normalizers").EnumerateArray().Select(Build).ToList();
                return s => parts.Aggregate(s, (acc, f) => f(acc));
            case "NFC": return s => s.Normalize(NormalizationForm.FormC);
            case "NFD": return s => s.Normalize(NormalizationForm.FormD);
            case "NFKC": return s => s.Normalize(NormalizationForm.FormKC);
            case "NFKD": return s => s.Normalize(NormalizationForm.FormKD);
            case "Lowercase": return s => s.ToLowerInvariant();
            case "Prepend":
                string prefix = n.GetProperty("prepend").GetString()!;
                return s => s.Length == 0 ? s : prefix + s;
            case "Replace":
                var (pattern, isRegex) = Pattern(n.GetProperty("pattern"));
                string content = n.GetProperty("content").GetString()!;
                if (isRegex)
                {
                    var re = new System.Text.RegularExpressions.Regex(pattern);
                    return s => re.Replace(s, content);
                }
                return s => s.Replace(pattern, content, StringComparison.Ordinal);
            case "Strip":
                bool left = n.GetProperty("strip_left").GetBoolean(), right = n.GetProperty("strip_right").GetBoolean();
                return s => left && right ? s.Trim() : left ? s.TrimStart() : right ? s.TrimEnd() : s;
            default:
                throw new NotSupportedException($"tokenizer.json: unsupported normalizer type '{type}'");
        }
    }

    /// <summary>A pattern object: {"String": "..."} or {"Regex": "..."}.</summary>
    public static (string pattern, bool isRegex) Pattern(JsonElement p) =>
        p.TryGetProperty("Regex", out var r) ? (r.GetString()!, true) : (p.GetProperty("String").GetString()!, false);
}
