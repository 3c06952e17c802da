using System.Globalization;
using System.Reflection;
using System.Text;
using System.Text.Json;
using YamlDotNet.Core;
using YamlDotNet.Core.Events;

namespace LoraKit.Training;

/// <summary>
/// Reads a train config file (JSON or YAML: one flat mapping of keys to scalars or lists of scalars) into a
/// <see cref="TrainConfig"/>. Keys are LoraKit's snake_case names, or the Hugging Face Trainer / PEFT spellings people
/// paste (learning_rate, num_train_epochs, per_device_train_batch_size, lora_r, …). Every error names the file, the
/// line and the key as the user wrote it: an unknown key with the nearest known one, a value of the wrong type with the
/// type expected. YAML anchors and aliases are refused (a few hundred bytes of them can expand to gigabytes), and
/// nothing nested is read beyond the first level.
/// </summary>
public static class TrainConfigFile
{
    public const long MaxBytes = 1 << 20;

    /// <summary>A value as written: a scalar (text; JSON's kind, or String for YAML), a list of scalars, or a mapping (always an error).</summary>
    sealed record Value(string? Text, JsonValueKind Kind, bool Quoted, List<Value>? Items = null, bool Mapping = false)
    {
        public string Describe() => Mapping ? "a mapping" : Items is not null ? "a list" : Kind switch
        {
            JsonValueKind.Null => "null",
            JsonValueKind.True or JsonValueKind.False => "a boolean",
            JsonValueKind.Number => "a number",
            _ => Quoted ? $"the string \"{Short(Text)}\"" : $"'{Short(Text)}'",
        };
    }

    sealed record Entry(string Key, int Line, Value Value);

    static string Short(string? s) => s is null ? "" : s.Length > 40 ? s[..40] + "…" : s;

    /// <summary>HF Trainer / PEFT / common trainer spellings → LoraKit's key.</summary>
    static readonly Dictionary<string, string> Aliases = new(StringComparer.Ordinal)
    {
        ["learning_rate"] = "lr", ["num_train_epochs"] = "epochs", ["max_steps"] = "steps",
        ["per_device_train_batch_size"] = "batch_size", ["train_batch_size"] = "batch_size", ["micro_batch_size"] = "batch_size",
        ["gradient_accumulation_steps"] = "grad_accum", ["lora_r"] = "r", ["rank"] = "r", ["lora_target_modules"] = "target_modules",
        ["lr_scheduler_type"] = "schedule", ["adam_beta1"] = "beta1", ["adam_beta2"] = "beta2", ["adam_epsilon"] = "adam_eps",
        ["max_seq_length"] = "max_length", ["max_seq_len"] = "max_length", ["model_max_length"] = "max_length", ["sequence_len"] = "max_length",
        ["model_name_or_path"] = "model", ["base_model"] = "model", ["train_file"] = "data", ["dataset"] = "data", ["train_data"] = "data",
        ["validation_file"] = "validation_data", ["eval_file"] = "validation_data", ["eval_data"] = "validation_data", ["output_dir"] = "output",
        ["eval_steps"] = "eval_every", ["save_steps"] = "save_every", ["logging_steps"] = "log_every", ["metric_for_best_model"] = "metric",
        ["dataset_text_field"] = "format", // only "text" is meaningful; checked below
        ["eval_suites"] = "eval_suite",
    };

    /// <summary>Keys people paste that LoraKit reads but that change nothing, or map onto another setting.</summary>
    static readonly HashSet<string> Special = ["bf16", "fp16", "task_type", "bias", "val_set_size"];

    static readonly Dictionary<string, PropertyInfo> Properties = typeof(TrainConfig).GetProperties()
        .ToDictionary(p => JsonNamingPolicy.SnakeCaseLower.ConvertName(p.Name), StringComparer.Ordinal);

    public static TrainConfig Load(string path)
    {
        if (Directory.Exists(path)) throw new LoraKitException($"config '{path}' is a directory, not a JSON or YAML file");
        if (!File.Exists(path)) throw new LoraKitException($"config file '{path}' not found");
        long size = new FileInfo(path).Length;
        if (size > MaxBytes) throw new LoraKitException($"{path}: {size:N0} bytes is too large for a train config (at most {MaxBytes:N0})");
        var bytes = IO.FileProblem.ReadAllBytes(path, MaxBytes);
        bool yaml = path.EndsWith(".yaml", StringComparison.OrdinalIgnoreCase) || path.EndsWith(".yml", StringComparison.OrdinalIgnoreCase);
        var entries = yaml ? ReadYaml(path, bytes) : ReadJson(path, bytes);
        return Apply(path, entries);
    }

    static List<Entry> ReadJson(string path, byte[] bytes)
    {
        int bom = bytes.AsSpan().StartsWith(Encoding.UTF8.Preamble) ? 3 : 0;
        var data = bytes.AsMemory(bom);
        var entries = new List<Entry>();
        var reader = new Utf8JsonReader(data.Span, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true, MaxDepth = 16 });
        int LineAt(long index)
        {
            int line = 1;
            var span = data.Span[..(int)Math.Min(index, data.Length)];
            foreach (var b in span) if (b == (byte)'\n') line++;
            return line;
        }
        try
        {
            if (!reader.Read()) return entries;
            if (reader.TokenType != JsonTokenType.StartObject) throw new LoraKitException($"{path}:{LineAt(reader.TokenStartIndex)}: a train config is one JSON object of keys and values");
            while (reader.Read() && reader.TokenType != JsonTokenType.EndObject)
            {
                string key = reader.GetString()!;
                int line = LineAt(reader.TokenStartIndex);
                reader.Read();
                entries.Add(new Entry(key, line, ReadJsonValue(ref reader)));
            }
            if (reader.Read()) throw new LoraKitException($"{path}:{LineAt(reader.TokenStartIndex)}: unexpected content after the config object");
        }
        catch (JsonException e)
        {
            throw new LoraKitException($"{path}:{(e.LineNumber ?? 0) + 1}: invalid JSON ({IO.JsonFiles.Reason(e)})");
        }
        catch (InvalidOperationException e)
        {
            throw new LoraKitException($"{path}: invalid JSON ({e.Message.Split('.')[0]})");
        }
        return entries;
    }

    static Value ReadJsonValue(ref Utf8JsonReader r)
    {
        switch (r.TokenType)
        {
            case JsonTokenType.StartObject:
                r.Skip();
                return new Value(null, JsonValueKind.Object, false, Mapping: true);
            case JsonTokenType.StartArray:
                var items = new List<Value>();
                bool nested = false;
                while (r.Read() && r.TokenType != JsonTokenType.EndArray)
                {
                    if (r.TokenType is JsonTokenType.StartArray or JsonTokenType.StartObject) { r.Skip(); nested = true; continue; }
                    items.Add(ReadJsonValue(ref r));
                }
                return nested ? new Value(null, JsonValueKind.Array, false, Mapping: true) : new Value(null, JsonValueKind.Array, false, items);
            case JsonTokenType.String: return new Value(r.GetString(), JsonValueKind.String, true);
            case JsonTokenType.Number: return new Value(Encoding.UTF8.GetString(r.ValueSpan), JsonValueKind.Number, false);
            case JsonTokenType.True: return new Value("true", JsonValueKind.True, false);
            case JsonTokenType.False: return new Value("false", JsonValueKind.False, false);
            default: return new Value(null, JsonValueKind.Null, false);
        }
    }

    static List<Entry> ReadYaml(string path, byte[] bytes)
    {
        string text;
        try { text = new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(bytes).TrimStart('\uFEFF'); }
        catch (DecoderFallbackException) { throw new LoraKitException($"{path}: not valid UTF-8 text"); }
        var entries = new List<Entry>();
        var parser = new Parser(new StringReader(text));
        int line = 1;
        try
        {
            T Next<T>() where T : ParsingEvent
            {
                if (!parser.MoveNext()) throw new LoraKitException($"{path}: unexpected end of the YAML");
                var e = parser.Current!;
                line = (int)e.Start.Line;
                if (e is AnchorAlias || e is NodeEvent { Anchor.IsEmpty: false })
                    throw new LoraKitException($"{path}:{line}: YAML anchors and aliases (&name, *name) are not supported in a train config; write the values out");
                return e as T ?? throw new LoraKitException($"{path}:{line}: a train config is one mapping of keys to values (found {Describe(e)})");
            }
            Next<StreamStart>();
            if (!parser.MoveNext() || parser.Current is StreamEnd) return entries;
            if (parser.Current is not DocumentStart) throw new LoraKitException($"{path}: a train config is one YAML document");
            var first = Next<ParsingEvent>();
            if (first is Scalar { Value: "" or "~" or "null" }) return entries; // an empty document
            if (first is not MappingStart) throw new LoraKitException($"{path}:{line}: a train config is one mapping of keys to values (found {Describe(first)})");
            while (true)
            {
                var k = Next<ParsingEvent>();
                if (k is MappingEnd) break;
                if (k is not Scalar key) throw new LoraKitException($"{path}:{line}: keys must be plain names (found {Describe(k)})");
                int keyLine = line;
                var v = Next<ParsingEvent>();
                Value value;
                switch (v)
                {
                    case Scalar s: value = YamlScalar(s); break;
                    case SequenceStart:
                        var items = new List<Value>();
                        bool nested = false;
                        for (var item = Next<ParsingEvent>(); item is not SequenceEnd; item = Next<ParsingEvent>())
                        {
                            if (item is Scalar si) items.Add(YamlScalar(si));
                            else { nested = true; break; }
                        }
                        value = nested ? new Value(null, JsonValueKind.Array, false, Mapping: true) : new Value(null, JsonValueKind.Array, false, items);
                        if (nested) { entries.Add(new Entry(key.Value, keyLine, value)); return entries; } // Apply reports it
                        break;
                    default:
                        entries.Add(new Entry(key.Value, keyLine, new Value(null, JsonValueKind.Object, false, Mapping: true)));
                        return entries; // the value is a mapping: Apply reports the key (or that it is unknown)
                }
                entries.Add(new Entry(key.Value, keyLine, value));
            }
            Next<DocumentEnd>();
            if (parser.MoveNext() && parser.Current is DocumentStart) throw new LoraKitException($"{path}:{parser.Current.Start.Line}: a train config is one YAML document, not several");
        }
        catch (YamlException e)
        {
            string reason = e.Message;
            int cut = reason.IndexOf("): ", StringComparison.Ordinal);
            if (reason.StartsWith("(Line", StringComparison.Ordinal) && cut > 0) reason = reason[(cut + 3)..];
            throw new LoraKitException($"{path}:{e.Start.Line}: invalid YAML ({reason.Split('\n')[0].TrimEnd('.')})");
        }
        return entries;
    }

    static string Describe(ParsingEvent e) => e switch
    {
        SequenceStart => "a list",
        MappingStart => "a mapping",
        Scalar s => $"'{Short(s.Value)}'",
        _ => e.GetType().Name.ToLowerInvariant(),
    };

    static Value YamlScalar(Scalar s)
    {
        bool quoted = s.Style is ScalarStyle.SingleQuoted or ScalarStyle.DoubleQuoted or ScalarStyle.Literal or ScalarStyle.Folded;
        if (!quoted && s.Value is "" or "~" or "null" or "Null" or "NULL") return new Value(null, JsonValueKind.Null, false);
        return new Value(s.Value, JsonValueKind.String, quoted);
    }

    static TrainConfig Apply(string path, List<Entry> entries)
    {
        var c = new TrainConfig();
        var setBy = new Dictionary<string, Entry>(StringComparer.Ordinal);
        foreach (var e in entries)
        {
            string where = $"{path}:{e.Line}";
            var prior = entries.First(x => x.Key == e.Key);
            if (!ReferenceEquals(prior, e)) throw new LoraKitException($"{where}: key '{Short(e.Key)}' is set twice (first on line {prior.Line})");
            if (Special.Contains(e.Key)) { ApplySpecial(c, where, e, setBy); continue; }
            string name = Aliases.GetValueOrDefault(e.Key, e.Key);
            if (!Properties.TryGetValue(name, out var prop))
            {
                string hint = e.Key == "warmup_ratio" ? " (LoraKit counts warm-up in steps: use warmup_steps)"
                    : Nearest(e.Key) is string near ? $" (did you mean '{near}'?)" : "";
                throw new LoraKitException($"{where}: unknown key '{Short(e.Key)}'{hint}");
            }
            if (setBy.TryGetValue(name, out var other))
                throw new LoraKitException($"{where}: '{Short(e.Key)}' and '{Short(other.Key)}' (line {other.Line}) both set {name}; keep one");
            setBy[name] = e;
            // One suite is a path, never a comma-separated list as target_modules may be.
            object? value = name == "eval_suite" && e.Value is { Kind: JsonValueKind.String, Items: null, Mapping: false, Text: { Length: > 0 } one }
                ? new List<string> { one } : Convert(where, e.Key, e.Value, prop.PropertyType);
            value = Translate(where, e.Key, name, value);
            prop.SetValue(c, value);
        }
        return c;
    }

    /// <summary>Values whose HF spelling differs from LoraKit's.</summary>
    static object? Translate(string where, string key, string name, object? value)
    {
        switch (name)
        {
            case "schedule" when value is string s:
                return s switch
                {
                    "constant" or "constant_with_warmup" => "constant",
                    "linear" => "linear",
                    "cosine" => "cosine",
                    _ => throw new LoraKitException($"{where}: {key} '{Short(s)}' is not supported (constant, constant_with_warmup, linear or cosine)"),
                };
            case "metric" when value is string m:
                return m switch
                {
                    "loss" or "eval_loss" => "eval_loss",
                    "accuracy" or "eval_accuracy" => "eval_accuracy",
                    _ when TrainConfig.SuiteMetrics.Contains(m) => m,
                    _ => throw new LoraKitException($"{where}: {key} '{Short(m)}' is not supported (eval_loss, eval_accuracy, {string.Join(", ", TrainConfig.SuiteMetrics)})"),
                };
            case "steps" when key == "max_steps" && value is int n && n < 0:
                return 0; // transformers' -1: not set
            case "format" when key == "dataset_text_field":
                if (value is not "text") throw new LoraKitException($"{where}: dataset_text_field '{Short(value as string)}' is not supported: LoraKit reads the \"text\" field (or prompt/completion, messages)");
                return "text";
        }
        return value;
    }

    static void ApplySpecial(TrainConfig c, string where, Entry e, Dictionary<string, Entry> setBy)
    {
        switch (e.Key)
        {
            case "bf16" or "fp16":
                if ((bool)Convert(where, e.Key, e.Value, typeof(bool))!)
                {
                    if (setBy.TryGetValue("dtype", out var other)) throw new LoraKitException($"{where}: '{Short(e.Key)}' and '{Short(other.Key)}' (line {other.Line}) both set dtype; keep one");
                    setBy["dtype"] = e;
                    c.Dtype = e.Key;
                }
                break;
            case "task_type":
                var t = (string?)Convert(where, e.Key, e.Value, typeof(string));
                if (t is not ("CAUSAL_LM" or "SEQ_CLS")) throw new LoraKitException($"{where}: task_type '{Short(t)}' is not supported (CAUSAL_LM or SEQ_CLS; the data's format decides)");
                break;
            case "bias":
                var b = (string?)Convert(where, e.Key, e.Value, typeof(string));
                if (b != "none") throw new LoraKitException($"{where}: bias '{Short(b)}' is not supported (LoraKit trains no biases: 'none')");
                break;
            case "val_set_size":
                double v = (double)Convert(where, e.Key, e.Value, typeof(double))!;
                if (v >= 1) throw new LoraKitException($"{where}: val_set_size {v} counts samples; LoraKit takes a fraction: validation_fraction");
                c.ValidationFraction = v;
                break;
        }
    }

    static object? Convert(string where, string key, Value v, Type type)
    {
        var underlying = Nullable.GetUnderlyingType(type);
        bool nullable = underlying is not null || (type == typeof(string) && key is "validation_data" or "init_adapter" or "dtype" or "validation_file" or "eval_file" or "eval_data");
        var t = underlying ?? type;
        string Expected() => t == typeof(int) ? "an integer" : t == typeof(double) ? "a number" : t == typeof(bool) ? "true or false"
            : t == typeof(List<string>) ? (key is "eval_suite" or "eval_suites" ? "a file path or a list of them" : "a list of names (or one name, e.g. all-linear)") : "a string";
        LoraKitException Wrong() => new($"{where}: '{Short(key)}' must be {Expected()}, not {v.Describe()}");
        if (v.Mapping) throw Wrong();
        if (v.Kind == JsonValueKind.Null)
            return nullable ? null : throw Wrong();
        if (t == typeof(List<string>))
        {
            if (v.Items is { } items)
            {
                if (items.Count == 0) throw new LoraKitException($"{where}: '{Short(key)}' is an empty list");
                return items.Select(i => i.Kind == JsonValueKind.String && i.Text is { Length: > 0 } s ? s : throw Wrong()).ToList();
            }
            if (v.Kind != JsonValueKind.String || string.IsNullOrWhiteSpace(v.Text)) throw Wrong();
            return v.Text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList();
        }
        if (v.Items is not null) throw Wrong();
        string text = v.Text!;
        // JSON says what a value is; a YAML scalar is text whose reading depends on the key (quoted text is a string).
        bool numberLike = v.Kind == JsonValueKind.Number || (v.Kind == JsonValueKind.String && !v.Quoted);
        if (t == typeof(string))
            return v.Kind == JsonValueKind.String ? text : throw Wrong();
        if (t == typeof(bool))
        {
            if (v.Kind is JsonValueKind.True or JsonValueKind.False) return v.Kind == JsonValueKind.True;
            if (v.Kind == JsonValueKind.String && !v.Quoted && text is "true" or "True" or "TRUE" or "false" or "False" or "FALSE")
                return text.Equals("true", StringComparison.OrdinalIgnoreCase);
            throw Wrong();
        }
        if (!numberLike || !double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double d)) throw Wrong();
        if (!double.IsFinite(d)) throw new LoraKitException($"{where}: '{Short(key)}' must be a finite number, not {Short(text)}");
        if (t == typeof(double)) return d;
        if (t == typeof(int))
        {
            if (d != Math.Floor(d)) throw new LoraKitException($"{where}: '{Short(key)}' must be an integer, not {Short(text)}");
            if (d is > int.MaxValue or < int.MinValue) throw new LoraKitException($"{where}: '{Short(key)}' is out of range ({Short(text)})");
            return (int)d;
        }
        throw Wrong();
    }

    /// <summary>The known key (LoraKit's or an HF spelling) closest to a mistyped one, if any is close.</summary>
    static string? Nearest(string key)
    {
        var names = Properties.Keys.Concat(Aliases.Keys).Concat(Special);
        var (best, dist) = names.Select(n => (n, d: Distance(key.ToLowerInvariant(), n))).MinBy(x => x.d);
        // A prefix or containment (lr_rate ~ lr, lora_rank ~ r) also counts when the edit distance is not small.
        if (dist <= Math.Max(2, key.Length / 3)) return Canonical(best);
        var contained = Properties.Keys.Where(n => n.Length >= 2 && (key.StartsWith(n + "_", StringComparison.Ordinal) || key.EndsWith("_" + n, StringComparison.Ordinal)))
            .MaxBy(n => n.Length);
        return contained;
    }

    static string Canonical(string name) => Aliases.TryGetValue(name, out var to) ? $"{to}" : name;

    static int Distance(string a, string b)
    {
        if (a.Length > 64 || b.Length > 64) return int.MaxValue;
        var prev = new int[b.Length + 1];
        var cur = new int[b.Length + 1];
        for (int j = 0; j <= b.Length; j++) prev[j] = j;
        for (int i = 1; i <= a.Length; i++)
        {
            cur[0] = i;
            for (int j = 1; j <= b.Length; j++)
                cur[j] = Math.Min(Math.Min(cur[j - 1] + 1, prev[j] + 1), prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            (prev, cur) = (cur, prev);
        }
        return prev[b.Length];
    }
}
