using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace LoraKit.Lora;

/// <summary>
/// A LoRA adapter's configuration with PEFT's field names and semantics (adapter_config.json round-trips).
/// Targets are a list of module names or suffixes, a regex (full match against the module path), or "all-linear".
/// </summary>
public sealed record LoraConfig
{
    public const string AllLinear = "all-linear";

    /// <summary>PEFT's default targets for the supported model types when target_modules is null.</summary>
    public static readonly IReadOnlyList<string> DefaultTargets = ["q_proj", "v_proj"];

    public int R { get; init; } = 8;
    public double LoraAlpha { get; init; } = 8;
    public double LoraDropout { get; init; }
    /// <summary>Module names or suffixes; null when <see cref="TargetRegex"/> is used.</summary>
    public IReadOnlyList<string>? TargetModules { get; init; } = DefaultTargets;
    /// <summary>A regex fully matched against module paths, or "all-linear".</summary>
    public string? TargetRegex { get; init; }
    public IReadOnlyList<string>? ExcludeModules { get; init; }
    public bool UseRslora { get; init; }
    /// <summary>true (Kaiming-uniform A, zero B), false (random B, for tests) or "gaussian".</summary>
    public string InitLoraWeights { get; init; } = "true";
    public IReadOnlyList<int>? LayersToTransform { get; init; }
    public IReadOnlyList<string>? LayersPattern { get; init; }
    public IReadOnlyDictionary<string, int> RankPattern { get; init; } = new Dictionary<string, int>();
    public IReadOnlyDictionary<string, double> AlphaPattern { get; init; } = new Dictionary<string, double>();
    public string Bias { get; init; } = "none";
    public IReadOnlyList<string>? ModulesToSave { get; init; }
    /// <summary>DoRA (weight-decomposed LoRA): PEFT's use_dora, see <see cref="DoraVariant"/>.</summary>
    public bool UseDora { get; init; }
    /// <summary>The variant this config's adapters use.</summary>
    public ILoraVariant Variant => UseDora ? DoraVariant.Instance : LoraVariant.Instance;
    public string? BaseModelNameOrPath { get; init; }
    public string TaskType { get; init; } = "CAUSAL_LM";
    /// <summary>Fields LoraKit does not interpret, written back unchanged.</summary>
    public JsonObject Extra { get; init; } = new();

    /// <summary>Rejects values PEFT would reject or LoraKit cannot honour, before anything is built.</summary>
    public void Validate()
    {
        if (R <= 0) throw new LoraConfigException($"r must be positive (got {R})");
        if (!(LoraAlpha > 0)) throw new LoraConfigException($"lora_alpha must be positive (got {LoraAlpha})");
        if (!(LoraDropout >= 0 && LoraDropout < 1)) throw new LoraConfigException($"lora_dropout must be in [0, 1) (got {LoraDropout})");
        if (Bias != "none") throw new LoraConfigException($"bias '{Bias}' is not supported (only 'none')");
        if (InitLoraWeights is not ("true" or "false" or "gaussian"))
            throw new LoraConfigException($"init_lora_weights '{InitLoraWeights}' is not supported (true, false or gaussian)");
        if (TargetModules is null && TargetRegex is null) throw new LoraConfigException("no target_modules");
        if (TargetModules is { Count: 0 }) throw new LoraConfigException("target_modules is empty");
        if (!(LoraAlpha <= MaxAlpha)) throw new LoraConfigException($"lora_alpha {LoraAlpha} is implausibly large (at most {MaxAlpha:G})");
        foreach (var (k, v) in RankPattern) if (v <= 0) throw new LoraConfigException($"rank_pattern '{k}' must be positive (got {v})");
        foreach (var (k, v) in AlphaPattern)
            if (!(v > 0 && v <= MaxAlpha)) throw new LoraConfigException($"alpha_pattern '{k}' must be positive and at most {MaxAlpha:G} (got {v})");
        if (TargetRegex is not null && TargetRegex != AllLinear) CheckRegex(TargetRegex, "target_modules regex");
        foreach (var k in RankPattern.Keys) CheckRegex(k, $"rank_pattern key '{k}'");
        foreach (var k in AlphaPattern.Keys) CheckRegex(k, $"alpha_pattern key '{k}'");
        foreach (var k in LayersPattern ?? []) CheckRegex(k, $"layers_pattern '{k}'");
        if (LayersToTransform?.FirstOrDefault(l => l < 0) is int neg && neg < 0) throw new LoraConfigException($"layers_to_transform has a negative layer ({neg})");
        foreach (var field in new[] { "fan_in_fan_out", "lora_bias" })
            if (Extra[field] is JsonValue v && v.TryGetValue<bool>(out bool on) && on)
                throw new LoraConfigException($"{field}=true is not supported");
        if (Extra.ContainsKey("peft_type") && !(Extra["peft_type"] is JsonValue pt && pt.TryGetValue<string>(out var pts) && pts == "LORA"))
            throw new LoraConfigException($"peft_type {Show(Extra["peft_type"])} is not LORA (LoraKit reads LoRA adapters only)");
    }

    /// <summary>Largest lora_alpha accepted: beyond it the adapter's scale overflows low-precision activations.</summary>
    public const double MaxAlpha = 1e6;

    /// <summary>User regexes (targets, patterns) are matched with this timeout, so a catastrophic one fails fast.</summary>
    internal static readonly TimeSpan RegexTimeout = TimeSpan.FromSeconds(1);

    static void CheckRegex(string pattern, string what)
    {
        try { _ = new Regex(pattern, RegexOptions.None, RegexTimeout); }
        catch (ArgumentException e) { throw new LoraConfigException($"{what} is not a valid regex: {e.Message}"); }
    }

    /// <summary>Whether the module at <paramref name="key"/> (e.g. model.layers.0.self_attn.q_proj) gets this adapter.</summary>
    public bool Targets(string key)
    {
        if (ExcludeModules is { } ex && (ex.Contains(key) || ex.Any(e => key.EndsWith("." + e, StringComparison.Ordinal)))) return false;
        if (TargetRegex is { } regex) return Regex.IsMatch(key, $"^(?:{regex})$", RegexOptions.None, RegexTimeout);
        var targets = TargetModules!;
        if (targets.Contains(key)) return true;
        if (!targets.Any(t => key.EndsWith("." + t, StringComparison.Ordinal))) return false;
        if (LayersToTransform is not { Count: > 0 } layers) return true;
        Match? m = null;
        if (LayersPattern is not { Count: > 0 } patterns) m = Regex.Match(key, @"^.*?\.[^.]*\.(\d+)\.", RegexOptions.None, RegexTimeout);
        else
            foreach (var p in patterns)
                if ((m = Regex.Match(key, $@"^.*?\.{p}\.(\d+)\.", RegexOptions.None, RegexTimeout)).Success) break;
        return m is { Success: true } && int.TryParse(m.Groups[1].Value, out int layer) && layers.Contains(layer);
    }

    /// <summary>Rank for a module: the first rank_pattern key matching it (PEFT's get_pattern_key), else r.</summary>
    public int RankFor(string key) => PatternValue(RankPattern, key) ?? R;

    public double AlphaFor(string key) => PatternValue(AlphaPattern, key) ?? LoraAlpha;

    static T? PatternValue<T>(IReadOnlyDictionary<string, T> patterns, string key) where T : struct
    {
        foreach (var (pattern, value) in patterns)
            if (Regex.IsMatch(key, $@"^(.*\.)?({pattern})$", RegexOptions.None, RegexTimeout)) return value;
        return null;
    }

    public double Scaling(string key)
    {
        int r = RankFor(key);
        double alpha = AlphaFor(key);
        return UseRslora ? alpha / Math.Sqrt(r) : alpha / r;
    }

    // ---- adapter_config.json ----

    /// <summary>adapter_config.json files larger than this are refused unread (PEFT's are a few KB).</summary>
    public const long MaxConfigBytes = 1 << 20;

    public static LoraConfig Load(string adapterDir)
    {
        var path = Path.Combine(adapterDir, "adapter_config.json");
        if (!Directory.Exists(adapterDir))
            throw new LoraConfigException(File.Exists(adapterDir)
                ? $"adapter '{adapterDir}' is a file; give the directory holding adapter_config.json and adapter_model.safetensors"
                : $"adapter directory '{adapterDir}' does not exist");
        if (!File.Exists(path))
        {
            if (File.Exists(Path.Combine(adapterDir, "config.json")))
                throw new LoraConfigException($"{adapterDir} holds a model (config.json), not an adapter: no adapter_config.json");
            if (File.Exists(Path.Combine(adapterDir, "adapter", "adapter_config.json")))
                throw new LoraConfigException($"{adapterDir} is a training run folder, not an adapter; use {Path.Combine(adapterDir, "adapter")}");
            throw new LoraConfigException($"{adapterDir}: adapter_config.json not found");
        }
        JsonNode? node;
        try { node = JsonNode.Parse(ReadBounded(path), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }); }
        catch (JsonException e) { throw new LoraConfigException($"{path}: invalid JSON at line {(e.LineNumber ?? 0) + 1}{Near(e.Path)}: {IO.JsonFiles.Reason(e)}"); }
        try
        {
            var obj = node as JsonObject ?? throw new LoraConfigException($"not a JSON object");
            return FromJson(obj);
        }
        catch (LoraConfigException e) { throw new LoraConfigException($"{path}: {e.Message}"); }
    }

    /// <summary>The file's text, refusing more than <see cref="MaxConfigBytes"/> (also for devices and pipes, whose length reads 0).</summary>
    static string ReadBounded(string path)
    {
        using var fs = IO.FileProblem.OpenRead(path);
        var buffer = new byte[MaxConfigBytes + 1];
        int n = 0, read;
        while (n < buffer.Length && (read = fs.Read(buffer, n, buffer.Length - n)) > 0) n += read;
        if (n > MaxConfigBytes) throw new LoraConfigException($"{path}: larger than {MaxConfigBytes} bytes, too large for an adapter config");
        return new System.Text.UTF8Encoding(false, false).GetString(buffer, 0, n).TrimStart('\uFEFF');
    }

    static string Near(string? jsonPath) => jsonPath is null or "$" ? "" : $" (near '{jsonPath.TrimStart('$', '.')}')";

    static readonly HashSet<string> Known =
    [
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "init_lora_weights",
        "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "modules_to_save",
        "base_model_name_or_path", "task_type", "use_dora",
    ];

    /// <summary>Reads PEFT's fields; a field of the wrong type is a <see cref="LoraConfigException"/> naming it.</summary>
    public static LoraConfig FromJson(JsonObject o)
    {
        var extra = new JsonObject();
        foreach (var (k, v) in o) if (!Known.Contains(k)) extra[k] = v?.DeepClone();
        var (targets, regex) = o["target_modules"] switch
        {
            null => (DefaultTargets, (string?)null),
            JsonArray => (StringList(o, "target_modules"), null),
            JsonValue v when v.TryGetValue<string>(out var str) => (null, str),
            var other => throw new LoraConfigException($"'target_modules' must be a list of names, a regex string or null (got {Show(other)})"),
        };
        return new LoraConfig
        {
            R = Int(o, "r") ?? 8,
            LoraAlpha = Num(o, "lora_alpha") ?? 8,
            LoraDropout = Num(o, "lora_dropout") ?? 0,
            TargetModules = targets,
            TargetRegex = regex is not null && regex.Equals(AllLinear, StringComparison.OrdinalIgnoreCase) ? AllLinear : regex,
            ExcludeModules = StringList(o, "exclude_modules"),
            UseRslora = Bool(o, "use_rslora") ?? false,
            UseDora = Bool(o, "use_dora") ?? false,
            InitLoraWeights = o["init_lora_weights"] switch
            {
                null => "true",
                JsonValue v when v.TryGetValue<bool>(out var b) => b ? "true" : "false",
                JsonValue v when v.TryGetValue<string>(out var str) => str.ToLowerInvariant(),
                var other => throw new LoraConfigException($"'init_lora_weights' must be true, false or a method name (got {Show(other)})"),
            },
            LayersToTransform = o["layers_to_transform"] switch
            {
                null => null,
                JsonArray a => a.Select(x => AsInt(x) ?? throw new LoraConfigException($"'layers_to_transform' must list layer numbers (got {Show(x)})")).ToList(),
                JsonValue v => [Int(o, "layers_to_transform")!.Value],
                var other => throw new LoraConfigException($"'layers_to_transform' must be a layer number or a list of them (got {Show(other)})"),
            },
            LayersPattern = StringList(o, "layers_pattern"),
            RankPattern = Pattern<int>(o, "rank_pattern", AsInt),
            AlphaPattern = Pattern<double>(o, "alpha_pattern", AsNum),
            Bias = Str(o, "bias") ?? "none",
            ModulesToSave = StringList(o, "modules_to_save"),
            BaseModelNameOrPath = Str(o, "base_model_name_or_path"),
            TaskType = Str(o, "task_type") ?? "CAUSAL_LM",
            Extra = extra,
        };
    }

    static string Show(JsonNode? n)
    {
        var s = n?.ToJsonString() ?? "null";
        return s.Length > 60 ? s[..60] + "…" : s;
    }

    static int? AsInt(JsonNode? n) => n is JsonValue v
        ? v.TryGetValue<int>(out int i) ? i
        : v.TryGetValue<double>(out double d) && d == Math.Floor(d) && d is >= int.MinValue and <= int.MaxValue ? (int)d : null
        : null;

    static double? AsNum(JsonNode? n) => n is JsonValue v && v.TryGetValue<double>(out double d) ? d : null;

    static int? Int(JsonObject o, string field) => o[field] is null ? null
        : AsInt(o[field]) ?? throw new LoraConfigException($"'{field}' must be an integer (got {Show(o[field])})");

    static double? Num(JsonObject o, string field) => o[field] is null ? null
        : AsNum(o[field]) ?? throw new LoraConfigException($"'{field}' must be a number (got {Show(o[field])})");

    static bool? Bool(JsonObject o, string field) => o[field] switch
    {
        null => null,
        JsonValue v when v.TryGetValue<bool>(out bool b) => b,
        var other => throw new LoraConfigException($"'{field}' must be true or false (got {Show(other)})"),
    };

    static string? Str(JsonObject o, string field) => o[field] switch
    {
        null => null,
        JsonValue v when v.TryGetValue<string>(out var str) => str,
        var other => throw new LoraConfigException($"'{field}' must be a string (got {Show(other)})"),
    };

    static IReadOnlyList<string>? StringList(JsonObject o, string field) => o[field] switch
    {
        null => null,
        JsonArray a => a.Select(x => x is JsonValue v && v.TryGetValue<string>(out var str) ? str
            : throw new LoraConfigException($"'{field}' must list strings (got {Show(x)} in it)")).ToList(),
        JsonValue v when v.TryGetValue<string>(out var str) => [str],
        var other => throw new LoraConfigException($"'{field}' must be a string or a list of strings (got {Show(other)})"),
    };

    static Dictionary<string, T> Pattern<T>(JsonObject o, string field, Func<JsonNode?, T?> value) where T : struct => o[field] switch
    {
        null => new Dictionary<string, T>(),
        JsonObject p => p.ToDictionary(kv => kv.Key, kv => value(kv.Value)
            ?? throw new LoraConfigException($"'{field}' value for '{kv.Key}' must be a {(typeof(T) == typeof(int) ? "whole number" : "number")} (got {Show(kv.Value)})")),
        var other => throw new LoraConfigException($"'{field}' must be an object of pattern: value (got {Show(other)})"),
    };

    /// <summary>The adapter_config.json PEFT reads: known fields from this record, the rest as loaded.</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["peft_type"] = "LORA",
            ["task_type"] = TaskType,
            ["base_model_name_or_path"] = BaseModelNameOrPath,
            ["r"] = R,
            ["lora_alpha"] = LoraAlpha == Math.Floor(LoraAlpha) ? JsonValue.Create((long)LoraAlpha) : JsonValue.Create(LoraAlpha),
            ["lora_dropout"] = LoraDropout,
            ["target_modules"] = TargetRegex is not null ? JsonValue.Create(TargetRegex) : new JsonArray(TargetModules!.Select(t => (JsonNode?)JsonValue.Create(t)).ToArray()),
            ["exclude_modules"] = ExcludeModules is null ? null : new JsonArray(ExcludeModules.Select(t => (JsonNode?)JsonValue.Create(t)).ToArray()),
            ["use_rslora"] = UseRslora,
            ["init_lora_weights"] = InitLoraWeights switch { "true" => JsonValue.Create(true), "false" => JsonValue.Create(false), var s => JsonValue.Create(s) },
            ["layers_to_transform"] = LayersToTransform is null ? null : new JsonArray(LayersToTransform.Select(i => (JsonNode?)JsonValue.Create(i)).ToArray()),
            ["layers_pattern"] = LayersPattern is null ? null : new JsonArray(LayersPattern.Select(t => (JsonNode?)JsonValue.Create(t)).ToArray()),
            ["rank_pattern"] = new JsonObject(RankPattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value)))),
            ["alpha_pattern"] = new JsonObject(AlphaPattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value)))),
            ["bias"] = Bias,
            ["modules_to_save"] = ModulesToSave is null ? null : new JsonArray(ModulesToSave.Select(t => (JsonNode?)JsonValue.Create(t)).ToArray()),
            ["fan_in_fan_out"] = false,
            ["use_dora"] = UseDora,
            ["inference_mode"] = true,
        };
        foreach (var (k, v) in Extra) if (!o.ContainsKey(k)) o[k] = v?.DeepClone();
        return o;
    }

    public void Save(string adapterDir)
    {
        Directory.CreateDirectory(adapterDir);
        File.WriteAllText(Path.Combine(adapterDir, "adapter_config.json"), ToJson().ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}

/// <summary>An adapter configuration (or its pairing with a base model) LoraKit refuses; the server answers 422.</summary>
public class LoraConfigException(string message) : LoraKitException(OneLine(message))
{
    /// <summary>
    /// Messages quote names from the user's files (keys, patterns, paths); control characters in them are escaped so
    /// the error stays one printable line.
    /// </summary>
    internal static string OneLine(string s)
    {
        if (!s.Any(char.IsControl) && s.Length <= 2000) return s;
        var sb = new System.Text.StringBuilder(Math.Min(s.Length, 2000));
        foreach (char c in s)
        {
            if (sb.Length >= 1990) { sb.Append('…'); break; }
            if (char.IsControl(c)) sb.Append($"\\u{(int)c:x4}"); else sb.Append(c);
        }
        return sb.ToString();
    }
}

/// <summary>
/// An adapter LoraKit wrote for one base model, loaded onto another (different fingerprint or architecture). Callers
/// can override with AllowBaseMismatch; the CLI names its flag.
/// </summary>
public sealed class AdapterBaseMismatchException(string message) : LoraConfigException(message);
