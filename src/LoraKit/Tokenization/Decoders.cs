using System.Globalization;
using System.Text;
using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>tokenizer.json "decoder" section: a chain over the token strings, joined at the end.</summary>
public static class Decoders
{
    public delegate List<string> Step(List<string> tokens);

    public static Step Build(JsonElement d)
    {
        if (d.ValueKind == JsonValueKind.Null) return t => [string.Join(" ", t)];
        string type = d.GetProperty("type").GetString()!;
        switch (type)
        {
            case "Sequence":
                var steps = d.GetProperty("decoders").EnumerateArray().Select(Build).ToList();
                return t => steps.Aggregate(t, (acc, s) => s(acc));
            case "ByteLevel":
                return t => [DecodeByteLevel(t)];
            case "Replace":
            {
                var (pattern, isRegex) = Normalizers.Pattern(d.GetProperty("pattern"));
                if (isRegex) throw new NotSupportedException("tokenizer.json: regex Replace decoder is not supported");
                string content = d.GetProperty("content").GetString()!;
                return t => t.Select(x => x.Replace(pattern, content, StringComparison.Ordinal)).ToList();
            }
            case "ByteFallback": return ByteFallback;
            case "Fuse": return t => [string.Concat(t)];
            case "Strip":
            {
                string content = d.GetProperty("content").GetString()!;
                int start = d.GetProperty("start").GetInt32(), stop = d.GetProperty("stop").GetInt32();
                return t => t.Select(x => Strip(x, content, start, stop)).ToList();
            }
            case "Metaspace":
            {
                string rep = d.GetProperty("replacement").GetString()!;
                string scheme = d.TryGetProperty("prepend_scheme", out var ps) ? ps.GetString()! :
                    (d.TryGetProperty("add_prefix_space", out var aps) && !aps.GetBoolean() ? "never" : "always");
                return t => t.Select((x, i) =>
                {
                    var s = x.Replace(rep, " ", StringComparison.Ordinal);
                    return i == 0 && scheme != "never" && s.StartsWith(' ') ? s[1..] : s;
                }).ToList();
            }
            default:
                throw new NotSupportedException($"tokenizer.json: unsupported decoder type '{type}'");
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
