using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraKit.Tokenization;

/// <summary>
/// tokenizer.json "pre_tokenizer" section: splits a normalised piece into words for the BPE model.
/// Each step maps a list of words to a new list; <c>isFirst</c> says whether the piece starts the original text
/// (Metaspace's prepend_scheme "first").
/// </summary>
public static class PreTokenizers
{
    public delegate List<string> Step(List<string> words, bool isFirst);

    // GPT-2's split, used by ByteLevel when use_regex is true.
    const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    public static Step Build(JsonElement p)
    {
        if (p.ValueKind == JsonValueKind.Null) return (w, _) => w;
        string type = p.GetProperty("type").GetString()!;
        switch (type)
        {
            case "Sequence":
                var steps = p.GetProperty("pretokenizers").EnumerateArray().Select(Build).ToList();
                return (w, first) => steps.Aggregate(w, (acc, s) => s(acc, first));
            case "Split":
            {
                var (pattern, isRegex) = Normalizers.Pattern(p.GetProperty("pattern"));
                var re = new Regex(isRegex ? pattern : Regex.Escape(pattern), RegexOptions.CultureInvariant);
                string behavior = p.GetProperty("behavior").GetString()!;
                bool invert = p.TryGetProperty("invert", out var inv) && inv.GetBoolean();
                if (invert) throw new NotSupportedException("tokenizer.json: Split with invert=true is not supported");
                return (w, _) => w.SelectMany(x => Split(x, re, behavior)).ToList();
            }
            case "ByteLevel":
            {
                bool prefix = p.TryGetProperty("add_prefix_space", out var ap) && ap.GetBoolean();
                bool useRegex = !p.TryGetProperty("use_regex", out var ur) || ur.GetBoolean();
                var re = new Regex(Gpt2Pattern, RegexOptions.CultureInvariant);
                return (w, first) => w.SelectMany(x =>
                {
                    if (prefix && first && !x.StartsWith(' ')) x = " " + x;
                    var parts = useRegex ? Split(x, re, "Isolated") : [x];
                    return parts.Select(ByteLevelAlphabet.Encode);
                }).ToList();
            }
            case "Metaspace":
            {
                string rep = p.GetProperty("replacement").GetString()!;
                string scheme = p.TryGetProperty("prepend_scheme", out var ps) ? ps.GetString()! :
                    (p.TryGetProperty("add_prefix_space", out var aps) && !aps.GetBoolean() ? "never" : "always");
                bool split = !p.TryGetProperty("split", out var sp) || sp.GetBoolean();
                return (w, first) => w.SelectMany(x =>
                {
                    x = x.Replace(" ", rep, StringComparison.Ordinal);
                    if ((scheme == "always" || (scheme == "first" && first)) && !x.StartsWith(rep, StringComparison.Ordinal))
                        x = rep + x;
                    return split ? SplitBefore(x, rep) : [x];
                }).ToList();
            }
            case "Digits":
            {
                bool individual = p.TryGetProperty("individual_digits", out var d) && d.GetBoolean();
                var re = new Regex(individual ? @"\p{Nd}" : @"\p{Nd}+");
                return (w, _) => w.SelectMany(x => Split(x, re, "Isolated")).ToList();
            }
            default:
                throw new NotSupportedException($"tokenizer.json: unsupported pre_tokenizer type '{type}'");
        }
    }

    /// <summary>HF's SplitDelimiterBehavior applied to the regex matches of one word.</summary>
    static List<string> Split(string s, Regex re, string behavior)
    {
        var result = new List<string>();
        int last = 0;
        string? pendingPrefix = null;
        bool prevWasMatch = false;
        foreach (Match m in re.Matches(s))
        {
            if (m.Length == 0) continue;
            string before = s[last..m.Index];
            if (before.Length > 0) prevWasMatch = false;
            switch (behavior)
            {
                case "Isolated":
                    if (before.Length > 0) result.Add(before);
                    result.Add(m.Value);
                    break;
                case "Removed":
                    if (before.Length > 0) result.Add(before);
                    break;
                case "MergedWithPrevious":
                    result.Add(before + m.Value);
                    break;
                case "MergedWithNext":
                    if (before.Length > 0) result.Add((pendingPrefix ?? "") + before);
                    else if (pendingPrefix != null) result.Add(pendingPrefix);
                    pendingPrefix = m.Value;
                    break;
                case "Contiguous":
                    if (before.Length > 0) result.Add(before);
                    if (before.Length == 0 && prevWasMatch) result[^1] += m.Value; // adjacent matches fuse
                    else result.Add(m.Value);
                    break;
                default: throw new NotSupportedException($"tokenizer.json: unsupported split behavior '{behavior}'");
            }
            last = m.Index + m.Length;
            prevWasMatch = true;
        }
        string tail = s[last..];
        if (behavior == "MergedWithNext")
        {
            if (pendingPrefix != null) result.Add(pendingPrefix + tail);
            else if (tail.Length > 0) result.Add(tail);
        }
        else if (tail.Length > 0) result.Add(tail);
        return result;
    }

    /// <summary>Splits so every occurrence of <paramref name="sep"/> begins a new word (Metaspace split).</summary>
    static List<string> SplitBefore(string s, string sep)
    {
        var result = new List<string>();
        if (s.Length == 0) return result;
        int start = 0;
        for (int i = s.IndexOf(sep, 1, StringComparison.Ordinal); i > 0; i = s.IndexOf(sep, i + sep.Length, StringComparison.Ordinal))
        {
            result.Add(s[start..i]);
            start = i;
        }
        if (start < s.Length) result.Add(s[start..]);
        return result;
    }
}
