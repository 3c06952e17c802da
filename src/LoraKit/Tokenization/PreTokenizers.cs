using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraKit.Tokenization;

/// <summary>
/// tokenizer.json "pre_tokenizer" section: splits a normalised piece into words for the BPE model.
/// Each step maps a list of words to a new list; <c>isFirst</c> says whether the piece starts the original text
/// (Metaspace's prepend_scheme "first").
/// </summary>
internal static class PreTokenizers
{
    public delegate List<string> Step(List<string> words, bool isFirst);

    // GPT-2's split, used by ByteLevel when use_regex is true.
    const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    public static Step Build(JsonElement p)
    {
        if (p.ValueKind is JsonValueKind.Null or JsonValueKind.Undefined) return (w, _) => w;
        string type = p.Str("type", "pre_tokenizer");
        switch (type)
        {
            case "Sequence":
                var steps = p.Arr("pretokenizers", "pre_tokenizer").Select(Build).ToList();
                return (w, first) => steps.Aggregate(w, (acc, s) => s(acc, first));
            case "Split":
            {
                var (pattern, isRegex) = Normalizers.Pattern(p.Req("pattern", "pre_tokenizer"), "pre_tokenizer.pattern");
                var re = Compile(isRegex ? pattern : Regex.Escape(pattern), "pre_tokenizer", RegexOptions.CultureInvariant);
                string behavior = p.Str("behavior", "pre_tokenizer");
                if (behavior is not ("Isolated" or "Removed" or "MergedWithPrevious" or "MergedWithNext" or "Contiguous"))
                    throw new NotSupportedException($"unsupported split behavior '{behavior}'");
                bool invert = p.Bool("invert", "pre_tokenizer", false);
                if (invert) throw new NotSupportedException("Split with invert=true is not supported");
                return (w, _) => w.SelectMany(x => Split(x, re, behavior)).ToList();
            }
            case "ByteLevel":
            {
                bool prefix = p.Bool("add_prefix_space", "pre_tokenizer", false);
                bool useRegex = p.Bool("use_regex", "pre_tokenizer", true);
                var re = Compile(Gpt2Pattern, "pre_tokenizer", RegexOptions.CultureInvariant);
                return (w, first) => w.SelectMany(x =>
                {
                    if (prefix && first && !x.StartsWith(' ')) x = " " + x;
                    var parts = useRegex ? Split(x, re, "Isolated") : [x];
                    return parts.Select(ByteLevelAlphabet.Encode);
                }).ToList();
            }
            case "Metaspace":
            {
                string rep = p.Str("replacement", "pre_tokenizer");
                if (rep.Length == 0) throw new TokenizerFormatException("'pre_tokenizer.replacement' must not be empty");
                string scheme = p.OptStr("prepend_scheme", "pre_tokenizer") ?? (p.Bool("add_prefix_space", "pre_tokenizer", true) ? "always" : "never");
                if (scheme is not ("always" or "first" or "never")) throw new NotSupportedException($"unsupported Metaspace prepend_scheme '{scheme}'");
                bool split = p.Bool("split", "pre_tokenizer", true);
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
                bool individual = p.Bool("individual_digits", "pre_tokenizer", false);
                var re = new Regex(individual ? @"\p{Nd}" : @"\p{Nd}+");
                return (w, _) => w.SelectMany(x => Split(x, re, "Isolated")).ToList();
            }
            default:
                throw new NotSupportedException($"unsupported pre_tokenizer type '{type}'");
        }
    }

    /// <summary>Longest a tokenizer.json regex may spend on one match before the pattern is reported as pathological.</summary>
    public static readonly TimeSpan MatchTimeout = TimeSpan.FromSeconds(2);

    /// <summary>
    /// Compiles a regex from tokenizer.json with a match timeout: a catastrophically backtracking pattern such as
    /// <c>(a+)+$</c> then fails in seconds (RegexMatchTimeoutException, which <see cref="Tokenizer.Encode"/> reports
    /// naming the file and pattern) instead of hanging the process.
    /// </summary>
    public static Regex Compile(string pattern, string where, RegexOptions options)
    {
        try { return new Regex(pattern, options, MatchTimeout); }
        catch (ArgumentException e)
        {
            string why = e is RegexParseException rp ? $"{rp.Error} at offset {rp.Offset}" : "invalid";
            throw new TokenizerFormatException($"'{where}' regex '{pattern}' is not a valid .NET regular expression ({why})");
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
                default: throw new NotSupportedException($"unsupported split behavior '{behavior}'");
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
