using System.Text.Json;
using LoraKit.Tokenization;

namespace LoraKit.Data;

/// <summary>A tokenised training example: ids and labels (<see cref="IgnoreIndex"/> where no loss is taken).</summary>
public sealed record Sample(int[] InputIds, int[] Labels, int Line)
{
    public const int IgnoreIndex = -100;
    /// <summary>For packed rows: which original sample each position belongs to (attention stays inside one).</summary>
    public int[]? Segments { get; init; }
    public int TargetCount => Labels.Count(l => l != IgnoreIndex);
}

/// <summary>A JSONL training file's layout: <c>Auto</c> detects it from the first line's fields ("messages" → Chat,
/// "prompt"/"completion" → PromptCompletion, "label" → Classification, "text" → Text).</summary>
public enum DataFormat { Auto, Text, PromptCompletion, Chat, Classification }

/// <summary>How samples are built from JSONL lines.</summary>
public sealed record DataOptions
{
    public DataFormat Format { get; init; } = DataFormat.Auto;
    /// <summary>Take loss on every token, not only the completion / assistant turns.</summary>
    public bool TrainOnAllTokens { get; init; }
    /// <summary>Append EOS to text and completion samples (as TRL does).</summary>
    public bool AppendEos { get; init; } = true;
    public int MaxLength { get; init; } = 1024;
    /// <summary>Skip malformed lines (and count them) instead of stopping at the first.</summary>
    public bool SkipBadLines { get; init; }
}

/// <summary>What loading a JSONL file gave: the format used, samples kept, their tokens and loss-bearing tokens, lines
/// skipped (with the problems found) and samples truncated to the maximum length.</summary>
public sealed record DataSummary(string Path, DataFormat Format, int Samples, long Tokens, long TargetTokens, int Skipped, int Truncated, IReadOnlyList<string> Problems)
{
    /// <summary>The sha256 (hex) of the file's bytes when the reader recorded it (a training run does: report.json <c>data.sha256</c>).</summary>
    public string? Sha256 { get; init; }
    /// <summary>The file's size in bytes, recorded with <see cref="Sha256"/>.</summary>
    public long? Bytes { get; init; }
}

/// <summary>A training/evaluation data file that cannot be used (missing, not JSONL, bad fields, no usable samples); the
/// one-line message names the file and, where it can, the line.</summary>
public sealed class DataException(string message) : LoraKitException(message);

/// <summary>
/// Reads a JSONL file of one of three shapes — {"text"}, {"prompt","completion"}, {"messages":[{"role","content"}]}
/// (rendered by the model's chat template) — or {"text","label"} for classification. A malformed line is an error naming
/// the file and line, or, with SkipBadLines, is skipped and counted; nothing is dropped silently.
/// </summary>
public static class JsonlDataset
{
    static readonly HashSet<string> Roles = ["system", "user", "assistant", "tool"];

    public static (List<Sample> samples, DataSummary summary) Load(string path, Tokenizer tok, DataOptions o, IReadOnlyList<string>? labels = null)
    {
        if (Directory.Exists(path)) throw new DataException($"{path}: is a directory; give a JSONL file (one JSON object per line)");
        if (!File.Exists(path)) throw new DataException($"{path}: file not found");
        return Read(Lines(path), path, tok, o, labels);
    }

    /// <summary>
    /// Builds samples from lines already in memory (the in-memory trainer's examples, one JSON object each) exactly as
    /// <see cref="Load"/> builds a file's; <paramref name="source"/> names them in messages as the path names a file.
    /// </summary>
    public static (List<Sample> samples, DataSummary summary) Read(IEnumerable<(int line, string text, string? invalid)> lines, string source,
        Tokenizer tok, DataOptions o, IReadOnlyList<string>? labels = null)
    {
        string path = source;
        var samples = new List<Sample>();
        var problems = new List<string>();
        var format = o.Format;
        int truncated = 0;
        foreach (var (lineNo, raw, badUtf8) in lines)
        {
            if (badUtf8 is null && string.IsNullOrWhiteSpace(raw)) continue;
            try
            {
                if (badUtf8 is not null) throw new DataException(badUtf8);
                using var doc = JsonDocument.Parse(raw);
                var e = doc.RootElement;
                if (e.ValueKind != JsonValueKind.Object) throw new DataException("line is not a JSON object");
                if (format == DataFormat.Auto) format = Detect(e);
                var s = Build(e, format, tok, o, lineNo, labels);
                if (s.InputIds.Length > o.MaxLength)
                {
                    s = format == DataFormat.Classification // Labels holds the class index
                        ? new Sample(s.InputIds[..o.MaxLength], s.Labels, lineNo)
                        : new Sample(s.InputIds[..o.MaxLength], s.Labels[..o.MaxLength], lineNo);
                    truncated++;
                }
                if (s.TargetCount == 0 && format != DataFormat.Classification)
                    throw new DataException("no tokens to train on after truncation (is the prompt longer than max length?)");
                samples.Add(s);
            }
            catch (Exception ex) when (ex is JsonException or DataException or InvalidOperationException or Templating.TemplateException)
            {
                string msg = $"{path}:{lineNo}: {(ex is JsonException ? "invalid JSON (" + ex.Message.Split('.')[0] + ")" : ex.Message)}";
                if (!o.SkipBadLines) throw new DataException(msg + " (use `skip_bad_lines` to skip such lines and count them)");
                problems.Add(msg);
            }
        }
        if (samples.Count == 0) throw new DataException($"{path}: no usable samples" + (problems.Count > 0 ? $" ({problems.Count} bad lines; first: {problems[0]})" : ""));
        var summary = new DataSummary(path, format, samples.Count, samples.Sum(s => (long)s.InputIds.Length), samples.Sum(s => (long)s.TargetCount),
            problems.Count, truncated, problems);
        return (samples, summary);
    }

    /// <summary>The sorted label set of a classification file ({"text","label"} lines), or null for other formats.</summary>
    public static List<string>? ClassificationLabels(string path)
    {
        if (!File.Exists(path)) return null;
        var labels = new SortedSet<string>(StringComparer.Ordinal);
        bool classification = false;
        foreach (var (_, line, bad) in Lines(path))
        {
            if (bad is not null || string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                var e = doc.RootElement;
                if (e.ValueKind != JsonValueKind.Object) continue;
                if (Detect(e) != DataFormat.Classification) return classification ? labels.ToList() : null;
                classification = true;
                if (LabelText(e.GetProperty("label")) is string l) labels.Add(l);
            }
            catch (Exception ex) when (ex is JsonException or DataException or InvalidOperationException) { } // reported with its line number by Load
        }
        return classification ? labels.ToList() : null;
    }

    /// <summary>A label as text: a non-empty string or a number; null for anything else (Load reports it).</summary>
    static string? LabelText(JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.String when v.GetString() is { Length: > 0 } s => s,
        JsonValueKind.Number => v.GetRawText(),
        _ => null,
    };

    /// <summary>
    /// The file's lines (1-based numbers), decoded strictly: a line that is not valid UTF-8 comes with the reason instead
    /// of being read with replacement characters. A UTF-8 byte order mark at the start is skipped; CRLF endings are read.
    /// </summary>
    /// <summary>The longest line read (a JSONL sample is KBs; a file without newlines, or /dev/zero, would fill memory).</summary>
    public const int MaxLineBytes = 64 << 20;

    public static IEnumerable<(int line, string text, string? invalid)> Lines(string path)
    {
        var utf8 = new System.Text.UTF8Encoding(false, throwOnInvalidBytes: true);
        using var fs = new BufferedStream(IO.FileProblem.OpenRead(path), 1 << 16);
        var buf = new MemoryStream();
        int lineNo = 0, b;
        bool first = true;
        while (true)
        {
            b = fs.ReadByte();
            if (b != '\n' && b != -1)
            {
                if (buf.Length >= MaxLineBytes)
                    throw new DataException($"{path}:{lineNo + 1}: line longer than {MaxLineBytes:N0} bytes; is this a JSONL file (one JSON object per line)?");
                buf.WriteByte((byte)b);
                continue;
            }
            if (b == -1 && buf.Length == 0) yield break;
            lineNo++;
            var bytes = buf.GetBuffer().AsSpan(0, (int)buf.Length);
            if (first && bytes.StartsWith(System.Text.Encoding.UTF8.Preamble)) bytes = bytes[3..];
            first = false;
            if (bytes.Length > 0 && bytes[^1] == '\r') bytes = bytes[..^1];
            string text = "";
            string? invalid = null;
            try { text = utf8.GetString(bytes); }
            catch (System.Text.DecoderFallbackException e) { invalid = $"invalid UTF-8 (byte {Math.Max(0, e.Index) + 1} of the line); the file must be UTF-8 text"; }
            yield return (lineNo, text, invalid);
            buf.SetLength(0);
            if (b == -1) yield break;
        }
    }

    static DataFormat Detect(JsonElement e)
    {
        if (e.TryGetProperty("messages", out _)) return DataFormat.Chat;
        if (e.TryGetProperty("prompt", out _) || e.TryGetProperty("completion", out _)) return DataFormat.PromptCompletion;
        if (e.TryGetProperty("label", out _)) return DataFormat.Classification;
        if (e.TryGetProperty("text", out _)) return DataFormat.Text;
        throw new DataException("cannot tell the format: expected a \"text\", \"prompt\"/\"completion\" or \"messages\" field");
    }

    static string Field(JsonElement e, string name, bool allowEmpty = false)
    {
        if (!e.TryGetProperty(name, out var v)) throw new DataException($"missing field \"{name}\"");
        if (v.ValueKind != JsonValueKind.String) throw new DataException($"field \"{name}\" must be a string");
        var s = v.GetString()!;
        if (!allowEmpty && s.Length == 0) throw new DataException($"field \"{name}\" is empty");
        return s;
    }

    static Sample Build(JsonElement e, DataFormat format, Tokenizer tok, DataOptions o, int line, IReadOnlyList<string>? labels)
    {
        int? eos = tok.EosTokenId;
        switch (format)
        {
            case DataFormat.Text:
            {
                var ids = tok.Encode(Field(e, "text")).ToList();
                if (o.AppendEos && eos is int id1) ids.Add(id1);
                return new Sample(ids.ToArray(), ids.ToArray(), line);
            }
            case DataFormat.PromptCompletion:
            {
                var prompt = tok.Encode(Field(e, "prompt", allowEmpty: true));
                var completion = tok.Encode(Field(e, "completion"), addSpecialTokens: false).ToList();
                if (o.AppendEos && eos is int id2) completion.Add(id2);
                var ids = prompt.Concat(completion).ToArray();
                var lbl = (o.TrainOnAllTokens ? prompt : prompt.Select(_ => Sample.IgnoreIndex)).Concat(completion).ToArray();
                return new Sample(ids, lbl, line);
            }
            case DataFormat.Chat:
                return ChatSample(e, tok, o, line);
            case DataFormat.Classification:
            {
                if (labels is null) throw new DataException("classification data needs the label set");
                var text = Field(e, "text");
                if (!e.TryGetProperty("label", out var lv)) throw new DataException("missing field \"label\"");
                string label = LabelText(lv) ?? throw new DataException($"field \"label\" must be a non-empty string or a number, not {(lv.ValueKind == JsonValueKind.String ? "an empty string" : lv.ValueKind.ToString().ToLowerInvariant())}");
                int index = labels.ToList().IndexOf(label);
                if (index < 0) throw new DataException($"label '{label}' is not one of the known labels");
                return new Sample(tok.Encode(text), [index], line);
            }
            default: throw new DataException($"unknown format {format}");
        }
    }

    /// <summary>
    /// Renders the conversation through the chat template and marks assistant turns as targets: each assistant turn's
    /// text is the difference between rendering the conversation through that turn and rendering it up to the turn with
    /// the generation prompt, so the labels cover exactly what the model must produce (end-of-turn token included).
    /// </summary>
    static Sample ChatSample(JsonElement e, Tokenizer tok, DataOptions o, int line)
    {
        if (!e.TryGetProperty("messages", out var msgs) || msgs.ValueKind != JsonValueKind.Array || msgs.GetArrayLength() == 0)
            throw new DataException("\"messages\" must be a non-empty array");
        var messages = new List<ChatTurn>();
        int k = 0;
        foreach (var m in msgs.EnumerateArray())
        {
            if (m.ValueKind != JsonValueKind.Object) throw new DataException($"message {k} is not an object");
            var role = Field(m, "role");
            if (!Roles.Contains(role)) throw new DataException($"message {k} has unknown role '{role}' (expected system, user, assistant or tool)");
            var content = Field(m, "content", allowEmpty: role != "assistant");
            messages.Add(new ChatTurn(role, content));
            k++;
        }
        if (!messages.Any(m => m.Role == "assistant")) throw new DataException("conversation has no assistant message to learn from");
        var template = new ChatTemplate(tok.Config.ChatTemplate ?? throw new DataException("chat data needs a chat template, and the tokenizer has none"));

        var ids = new List<int>();
        var lbl = new List<int>();
        string done = "";
        void Append(string text, bool target)
        {
            var piece = tok.Encode(text, addSpecialTokens: false);
            ids.AddRange(piece);
            lbl.AddRange(target || o.TrainOnAllTokens ? piece : piece.Select(_ => Sample.IgnoreIndex));
        }
        for (int i = 0; i < messages.Count; i++)
        {
            if (messages[i].Role != "assistant") continue;
            string before = template.Render(messages.Take(i), addGenerationPrompt: true, tok.Config);
            string through = template.Render(messages.Take(i + 1), addGenerationPrompt: false, tok.Config);
            if (!before.StartsWith(done, StringComparison.Ordinal) || !through.StartsWith(before, StringComparison.Ordinal))
                throw new DataException("the chat template does not render conversations as growing prefixes, so assistant turns cannot be located; use `train_on_all_tokens`");
            Append(before[done.Length..], false);
            Append(through[before.Length..], true);
            done = through;
        }
        string all = template.Render(messages, addGenerationPrompt: false, tok.Config);
        if (all.Length > done.Length && all.StartsWith(done, StringComparison.Ordinal)) Append(all[done.Length..], false);
        return new Sample(ids.ToArray(), lbl.ToArray(), line);
    }
}
