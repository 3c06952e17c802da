using System.Text.Json;
using LoraKit.Data;

namespace LoraKit.Classification;

/// <summary>One line of a classification file: its text and, when labelled, the index of its label.</summary>
public sealed record LabelledText(int Line, string Text, int? Label);

/// <summary>
/// Reads texts to classify from JSONL: {"text": …} lines, or {"text": …, "label": …} lines (then every line must be
/// labelled, and every label one of the classifier's). Errors name the file and line. Labels are strings, or integers
/// written as numbers (compared as their text, as training does).
/// </summary>
public static class ClassificationData
{
    public static List<LabelledText> Read(string path, IReadOnlyList<string> labels)
    {
        if (!File.Exists(path)) throw new DataException($"{path}: file not found");
        var index = labels.Select((l, i) => (l, i)).ToDictionary(x => x.l, x => x.i, StringComparer.Ordinal);
        var rows = new List<LabelledText>();
        int lineNo = 0;
        int? firstLabelled = null, firstUnlabelled = null;
        var utf8 = new System.Text.UTF8Encoding(false, throwOnInvalidBytes: true);
        using var reader = new StreamReader(path, utf8);
        while (true)
        {
            string? raw;
            try { raw = reader.ReadLine(); }
            catch (System.Text.DecoderFallbackException) { throw new DataException($"{path}:{lineNo + 1}: not valid UTF-8"); }
            if (raw is null) break;
            lineNo++;
            if (string.IsNullOrWhiteSpace(raw)) continue;
            string Where() => $"{path}:{lineNo}";
            JsonElement e;
            try
            {
                using var doc = JsonDocument.Parse(raw);
                e = doc.RootElement.Clone();
            }
            catch (JsonException ex) { throw new DataException($"{Where()}: invalid JSON ({ex.Message.Split('.')[0].Split(" Path:")[0]})"); }
            if (e.ValueKind != JsonValueKind.Object) throw new DataException($"{Where()}: the line is not a JSON object");
            var names = new HashSet<string>(StringComparer.Ordinal);
            foreach (var prop in e.EnumerateObject())
                if (!names.Add(prop.Name) && prop.Name is "text" or "label") throw new DataException($"{Where()}: field \"{prop.Name}\" appears twice");
            if (!e.TryGetProperty("text", out var t)) throw new DataException($"{Where()}: missing field \"text\"");
            if (t.ValueKind != JsonValueKind.String) throw new DataException($"{Where()}: field \"text\" must be a string");
            var text = Str(t, "text", Where);
            if (text.Length == 0) throw new DataException($"{Where()}: field \"text\" is empty");
            int? label = null;
            if (e.TryGetProperty("label", out var lv))
            {
                string name = lv.ValueKind switch
                {
                    JsonValueKind.String => Str(lv, "label", Where),
                    JsonValueKind.Number when lv.TryGetInt64(out long n) => n.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    _ => throw new DataException($"{Where()}: field \"label\" must be a string (or an integer), not {Kind(lv)}"),
                };
                if (!index.TryGetValue(name, out int k))
                    throw new DataException($"{Where()}: label '{Clip(name)}' is not one of the classifier's labels ({string.Join(", ", labels.Take(20))}{(labels.Count > 20 ? ", …" : "")})");
                label = k;
                firstLabelled ??= lineNo;
            }
            else firstUnlabelled ??= lineNo;
            if (firstLabelled is int fl && firstUnlabelled is int fu)
                throw new DataException($"{path}:{Math.Max(fl, fu)}: {(fl > fu ? "a labelled line among unlabelled ones" : "missing field \"label\" (line " + fl + " is labelled)")}; label every line or none");
            rows.Add(new LabelledText(lineNo, text, label));
        }
        if (rows.Count == 0) throw new DataException($"{path}: no lines to classify");
        return rows;
    }

    /// <summary>Tokenises every row for <paramref name="clf"/>; an empty or over-long text is an error naming its line.</summary>
    public static List<int[]> Encode(TextClassifier clf, string path, IReadOnlyList<LabelledText> rows) =>
        rows.Select(r =>
        {
            try { return clf.Encode(r.Text); }
            catch (DataException e) { throw new DataException($"{path}:{r.Line}: {e.Message}"); }
        }).ToList();

    static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Number => "a fractional number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        JsonValueKind.Array => "an array",
        JsonValueKind.Object => "an object",
        _ => e.ValueKind.ToString().ToLowerInvariant(),
    };

    /// <summary>A string value; one with a lone surrogate escape (not Unicode) is an error naming the field.</summary>
    static string Str(JsonElement e, string field, Func<string> where)
    {
        try { return e.GetString()!; }
        catch (InvalidOperationException) { throw new DataException($"{where()}: field \"{field}\" is not valid Unicode (a lone surrogate escape)"); }
    }

    /// <summary>A user's string for an error message: at most 80 characters, control characters escaped (one line).</summary>
    static string Clip(string s)
    {
        s = s.Length > 80 ? s[..80] + "…" : s;
        return System.Text.RegularExpressions.Regex.Replace(s, @"\p{C}", m => $"\\u{(int)m.Value[0]:x4}");
    }
}

/// <summary>Accuracy and the confusion matrix (rows: true label, columns: predicted) of predictions on labelled texts.</summary>
public sealed record ClassificationReport(IReadOnlyList<string> Labels, int Correct, int Total, long[][] Confusion)
{
    public double Accuracy => Total == 0 ? 0 : (double)Correct / Total;

    public static ClassificationReport Of(IReadOnlyList<string> labels, IReadOnlyList<int> truth, IReadOnlyList<int> predicted)
    {
        var m = labels.Select(_ => new long[labels.Count]).ToArray();
        int correct = 0;
        for (int i = 0; i < truth.Count; i++)
        {
            m[truth[i]][predicted[i]]++;
            if (truth[i] == predicted[i]) correct++;
        }
        return new ClassificationReport(labels, correct, truth.Count, m);
    }
}
