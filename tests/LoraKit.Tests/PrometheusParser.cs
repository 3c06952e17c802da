using System.Globalization;
using System.Text;

namespace LoraKit.Tests;

/// <summary>
/// A strict reader of Prometheus' text exposition format 0.0.4, for the tests of /metrics: every line is "# HELP",
/// "# TYPE" or a sample "name{labels} value"; every family has HELP and TYPE before its samples, once; sample names
/// belong to their family (histograms: _bucket, _sum, _count); counters end in _total and are ≥ 0; no sample repeats;
/// histogram buckets are ascending in le, cumulative (never decreasing), end at +Inf, and +Inf equals _count.
/// Any violation throws <see cref="FormatException"/> naming the line.
/// </summary>
public sealed class PrometheusParser
{
    public sealed record Sample(string Name, IReadOnlyDictionary<string, string> Labels, double Value);
    public sealed class Family(string name)
    {
        public string Name { get; } = name;
        public string? Help { get; set; }
        public string? Type { get; set; }
        public List<Sample> Samples { get; } = [];
    }

    public Dictionary<string, Family> Families { get; } = [];

    public static PrometheusParser Parse(string text)
    {
        var p = new PrometheusParser();
        if (text.Length > 0 && !text.EndsWith('\n')) throw new FormatException("the text does not end with a newline");
        var seen = new HashSet<string>();
        Family? current = null;
        int n = 0;
        foreach (var line in text.Split('\n')[..^1])
        {
            n++;
            string at = $"line {n} '{line}'";
            if (line.StartsWith("# HELP ", StringComparison.Ordinal) || line.StartsWith("# TYPE ", StringComparison.Ordinal))
            {
                var rest = line[7..];
                int sp = rest.IndexOf(' ');
                if (sp <= 0) throw new FormatException($"{at}: no metric name and text");
                var name = rest[..sp];
                CheckName(name, at);
                if (!p.Families.TryGetValue(name, out var f))
                {
                    if (current is not null) p.Close(current);
                    p.Families[name] = f = new Family(name);
                    current = f;
                }
                else if (f != current) throw new FormatException($"{at}: family {name} is split");
                if (line[2] == 'H')
                {
                    if (f.Help is not null) throw new FormatException($"{at}: a second HELP for {name}");
                    if (f.Samples.Count > 0) throw new FormatException($"{at}: HELP after samples");
                    f.Help = Unescape(rest[(sp + 1)..], help: true, at);
                }
                else
                {
                    if (f.Type is not null) throw new FormatException($"{at}: a second TYPE for {name}");
                    if (f.Samples.Count > 0) throw new FormatException($"{at}: TYPE after samples");
                    f.Type = rest[(sp + 1)..];
                    if (f.Type is not ("counter" or "gauge" or "histogram" or "summary" or "untyped")) throw new FormatException($"{at}: unknown type");
                    if (f.Type == "counter" && !name.EndsWith("_total", StringComparison.Ordinal)) throw new FormatException($"{at}: a counter's name must end in _total");
                }
                continue;
            }
            if (line.StartsWith('#')) throw new FormatException($"{at}: a comment that is neither HELP nor TYPE");
            var s = ParseSample(line, at);
            if (current is null || !Belongs(current, s.Name)) throw new FormatException($"{at}: sample outside its family's HELP/TYPE block");
            if (current.Help is null || current.Type is null) throw new FormatException($"{at}: family {current.Name} lacks HELP or TYPE");
            if (!seen.Add(s.Name + "{" + string.Join(",", s.Labels.OrderBy(l => l.Key, StringComparer.Ordinal).Select(l => $"{l.Key}={l.Value}")) + "}"))
                throw new FormatException($"{at}: a repeated sample");
            if (current.Type == "counter" && !(s.Value >= 0)) throw new FormatException($"{at}: a counter below 0");
            current.Samples.Add(s);
        }
        if (current is not null) p.Close(current);
        return p;
    }

    static bool Belongs(Family f, string sample) => sample == f.Name
        || (f.Type == "histogram" && (sample == f.Name + "_bucket" || sample == f.Name + "_sum" || sample == f.Name + "_count"));

    void Close(Family f)
    {
        if (f.Help is null || f.Type is null) throw new FormatException($"family {f.Name} lacks HELP or TYPE");
        if (f.Type != "histogram") return;
        foreach (var group in f.Samples.GroupBy(s => Key(s.Labels.Where(l => l.Key != "le"))))
        {
            var buckets = group.Where(s => s.Name.EndsWith("_bucket", StringComparison.Ordinal)).ToList();
            if (buckets.Count == 0) throw new FormatException($"{f.Name}{{{group.Key}}}: no buckets");
            double prevLe = double.NegativeInfinity, prevCount = 0;
            foreach (var b in buckets)
            {
                if (!b.Labels.TryGetValue("le", out var les)) throw new FormatException($"{f.Name}: a bucket without le");
                double le = ParseValue(les, f.Name);
                if (!(le > prevLe)) throw new FormatException($"{f.Name}{{{group.Key}}}: le {les} not ascending");
                if (b.Value < prevCount) throw new FormatException($"{f.Name}{{{group.Key}}}: bucket le={les} below the one before (not cumulative)");
                prevLe = le; prevCount = b.Value;
            }
            if (!double.IsPositiveInfinity(prevLe)) throw new FormatException($"{f.Name}{{{group.Key}}}: the last bucket is not +Inf");
            var count = group.SingleOrDefault(s => s.Name == f.Name + "_count") ?? throw new FormatException($"{f.Name}{{{group.Key}}}: no _count");
            _ = group.SingleOrDefault(s => s.Name == f.Name + "_sum") ?? throw new FormatException($"{f.Name}{{{group.Key}}}: no _sum");
            if (count.Value != prevCount) throw new FormatException($"{f.Name}{{{group.Key}}}: +Inf bucket {prevCount} != _count {count.Value}");
        }
    }

    static string Key(IEnumerable<KeyValuePair<string, string>> labels) =>
        string.Join(",", labels.OrderBy(l => l.Key, StringComparer.Ordinal).Select(l => $"{l.Key}={l.Value}"));

    static Sample ParseSample(string line, string at)
    {
        int i = 0;
        while (i < line.Length && line[i] != '{' && line[i] != ' ') i++;
        var name = line[..i];
        CheckName(name, at);
        var labels = new Dictionary<string, string>();
        if (i < line.Length && line[i] == '{')
        {
            i++;
            while (true)
            {
                if (i >= line.Length) throw new FormatException($"{at}: unterminated labels");
                if (line[i] == '}') { i++; break; }
                int eq = line.IndexOf('=', i);
                if (eq < 0) throw new FormatException($"{at}: a label without '='");
                var key = line[i..eq];
                if (key.Length == 0 || !(char.IsAsciiLetter(key[0]) || key[0] == '_') || !key.All(ch => char.IsAsciiLetterOrDigit(ch) || ch == '_'))
                    throw new FormatException($"{at}: bad label name '{key}'");
                if (eq + 1 >= line.Length || line[eq + 1] != '"') throw new FormatException($"{at}: label value not quoted");
                var value = new StringBuilder();
                int j = eq + 2;
                for (; ; j++)
                {
                    if (j >= line.Length) throw new FormatException($"{at}: unterminated label value");
                    char ch = line[j];
                    if (ch == '"') break;
                    if (ch == '\\')
                    {
                        if (++j >= line.Length) throw new FormatException($"{at}: a dangling backslash");
                        value.Append(line[j] switch { '\\' => '\\', '"' => '"', 'n' => '\n', _ => throw new FormatException($"{at}: bad escape \\{line[j]}") });
                    }
                    else value.Append(ch);
                }
                if (!labels.TryAdd(key, value.ToString())) throw new FormatException($"{at}: label {key} twice");
                i = j + 1;
                if (i < line.Length && line[i] == ',') i++;
                else if (i >= line.Length || line[i] != '}') throw new FormatException($"{at}: expected ',' or '}}' after a label");
            }
        }
        if (i >= line.Length || line[i] != ' ') throw new FormatException($"{at}: no single space before the value");
        var rest = line[(i + 1)..];
        if (rest.Contains(' ')) throw new FormatException($"{at}: trailing fields (timestamps are not written)");
        return new Sample(name, labels, ParseValue(rest, at));
    }

    static double ParseValue(string s, string at) => s switch
    {
        "+Inf" => double.PositiveInfinity,
        "-Inf" => double.NegativeInfinity,
        "NaN" => double.NaN,
        _ when s.Length > 0 && (char.IsAsciiDigit(s[0]) || s[0] is '-' or '.') && double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) => v,
        _ => throw new FormatException($"{at}: '{s}' is not a number"),
    };

    static void CheckName(string name, string at)
    {
        if (name.Length == 0 || !(char.IsAsciiLetter(name[0]) || name[0] is '_' or ':') || !name.All(ch => char.IsAsciiLetterOrDigit(ch) || ch is '_' or ':'))
            throw new FormatException($"{at}: bad metric name '{name}'");
    }

    static string Unescape(string s, bool help, string at)
    {
        var b = new StringBuilder();
        for (int i = 0; i < s.Length; i++)
        {
            if (s[i] != '\\') { b.Append(s[i]); continue; }
            if (++i >= s.Length) throw new FormatException($"{at}: a dangling backslash");
            b.Append(s[i] switch { '\\' => '\\', 'n' => '\n', _ => throw new FormatException($"{at}: bad escape in {(help ? "HELP" : "text")}") });
        }
        return b.ToString();
    }

    /// <summary>The value of the one sample named <paramref name="name"/> with exactly these labels (as "k=v" pairs).</summary>
    public double Value(string name, params string[] labels)
    {
        var want = labels.Select(l => l.Split('=', 2)).ToDictionary(kv => kv[0], kv => kv[1]);
        var hits = Families.Values.SelectMany(f => f.Samples).Where(s => s.Name == name && s.Labels.Count == want.Count && want.All(kv => s.Labels.TryGetValue(kv.Key, out var v) && v == kv.Value)).ToList();
        return hits.Count == 1 ? hits[0].Value : throw new KeyNotFoundException($"{hits.Count} samples {name}{{{string.Join(",", labels)}}}");
    }

    /// <summary>As <see cref="Value"/>, 0 when no sample has these labels yet (label sets appear on first use).</summary>
    public double ValueOrZero(string name, params string[] labels)
    {
        try { return Value(name, labels); }
        catch (KeyNotFoundException e) when (e.Message.StartsWith("0 samples", StringComparison.Ordinal)) { return 0; }
    }

    /// <summary>The type of the family <paramref name="name"/>.</summary>
    public string TypeOf(string name) => Families.TryGetValue(name, out var f) ? f.Type! : throw new KeyNotFoundException($"no family {name}");
}
