using System.Globalization;
using System.Text;
using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>tokenizer.json "decoder" section: a chain over the token strings, joined at the end.</summary>
internal static class Decoders
{
    public delegate List<string> Step(List<string> tokens);

    public static Step Build(JsonElement d)
    {
        if (d.ValueKind is JsonValueKind.Null or JsonValueKind.Undefined) return t => [string.Join(" ", t)];
        string type = d.Str("type", "decoder");
        switch (type)
        {
            case "Sequence":
                var steps = d.Arr("decoders", "decoder").Select(Build).ToList();
                return t => steps.Aggregate(t, (acc, s) => s(acc));
            case "ByteLevel":
                return t => [DecodeByteLevel(t)];
            case "Replace":
            {
                var (pattern, isRegex) = Normalizers.Pattern(d.Req("pattern", "decoder"), "decoder.pattern");
                if (isRegex) throw new NotSupportedException("regex Replace decoder is not supported");
                if (pattern.Length == 0) throw new TokenizerFormatException("'decoder.pattern' must not be empty");
                string content = d.Str("content", "decoder");
                return t => t.Select(x => x.Replace(pattern, content, StringComparison.Ordinal)).ToList();
            }
            case "ByteFallback": return ByteFallback;
            case "Fuse": return t => [string.Concat(t)];
            case "Strip":
            {
                string content = d.Str("content", "decoder");
                if (content.Length == 0) throw new TokenizerFormatException("'decoder.content' of Strip must not be empty");
                int start = d.Int("start", "decoder"), stop = d.Int("stop", "decoder");
                return t => t.Select(x => Strip(x, content, start, stop)).ToList();
            }
            case "Metaspace":
            {
                string rep = d.Str("replacement", "decoder");
                if (rep.Length == 0) throw new TokenizerFormatException("'decoder.replacement' must not be empty");
                string scheme = d.OptStr("prepend_scheme", "decoder") ?? (d.Bool("add_prefix_space", "decoder", true) ? "always" : "never");
                return t => t.Select((x, i) =>
                {
                    var s = x.Replace(rep, " ", StringComparison.Ordinal);
                    return i == 0 && scheme != "never" && s.StartsWith(' ') ? s[1..] : s;
                }).ToList();
            }
            default:
                throw new NotSupportedException($"unsupported decoder type '{type}'");
        }
    }

    static string DecodeByteLevel(List<string> tokens)
    {
        var bytes = new List<byte>();
        foreach (var tok in tokens)
        {
            // A token with any character outside the byte alphabet (an added token) contributes its UTF-8 bytes.
            if (tok.All(ByteLevelAlphabet.CharToByte.ContainsKey)) bytes.AddRange(tok.Select(c => ByteLevelAlphabet.CharToByte[c]));
            else bytes.AddRange(Encoding.UTF8.GetBytes(tok));
        }
        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    /// <summary>Runs of &lt;0xXX&gt; tokens become the bytes' UTF-8 text, or one U+FFFD per byte when invalid.</summary>
    static List<string> ByteFallback(List<string> tokens)
    {
        var result = new List<string>();
        var pending = new List<byte>();
        void Flush()
        {
            if (pending.Count == 0) return;
            try { result.Add(new UTF8Encoding(false, true).GetString(pending.ToArray())); }
            catch (DecoderFallbackException) { result.Add(new string('\uFFFD', pending.Count)); }
            pending.Clear();
        }
        foreach (var t in tokens)
        {
            if (t.Length == 6 && t.StartsWith("<0x", StringComparison.Ordinal) && t[5] == '>' &&
                byte.TryParse(t.AsSpan(3, 2), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out byte b))
            {
                pending.Add(b);
                continue;
            }
            Flush();
            result.Add(t);
        }
        Flush();
        return result;
    }

    static string Strip(string s, string content, int start, int stop)
    {
        char c = content[0];
        int left = 0, right = s.Length;
        while (left < start && left < right && s[left] == c) left++;
        int removed = 0;
        while (removed < stop && right > left && s[right - 1] == c) { right--; removed++; }
        return s[left..right];
    }
}
