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
        foreach (var (k, v) in RankPattern) if (v <= 0) throw new LoraConfigException($"rank_pattern '{k}' must be positive (got {v})");
        foreach (var (k, v) in AlphaPattern) if (!(v > 0)) throw new LoraConfigException($"alpha_pattern '{k}' must be positive (got {v})");
        if (TargetRegex is not null && TargetRegex != AllLinear)
        {
            try { _ = new Regex(TargetRegex); }
            catch (ArgumentException e) { throw new LoraConfigException($"target_modules regex is invalid: {e.Message}"); }
        }
        foreach (var field in new[] { "use_dora", "fan_in_fan_out", "lora_bias" })
            if (Extra[field] is JsonValue v && v.TryGetValue<bool>(out bool on) && on)
                throw new LoraConfigException($"{field}=true is not supported");
        if (Extra["peft_type"] is JsonValue pt && pt.GetValue<string>() != "LORA")
            throw new LoraConfigException($"peft_type '{pt}' is not LoRA");
    }

    /// <summary>Whether the module at <paramref name="key"/> (e.g. model.layers.0.self_attn.q_proj) gets this adapter.</summary>
    public bool Targets(string key)
    {
        if (ExcludeModules is { } ex && (ex.Contains(key) || ex.Any(e => key.EndsWith("." + e, StringComparison.Ordinal)))) return false;
        if (TargetRegex is { } regex) return Regex.IsMatch(key, $"^(?:{regex})$");
        var targets = TargetModules!;
        if (targets.Contains(key)) return true;
        if (!targets.Any(t => key.EndsWith("." + t, StringComparison.Ordinal))) return false;
        if (LayersToTransform is not { Count: > 0 } layers) return true;
        Match? m = null;
        if (LayersPattern is not { Count: > 0 } patterns) m = Regex.Match(key, @"^.*?\.[^.]*\.(\d+)\.");
        else
            foreach (var p in patterns)
                if ((m = Regex.Match(key, $@"^.*?\.{p}\.(\d+)\.")).Success) break;
        return m is { Success: true } && layers.Contains(int.Parse(m.Groups[1].Value));
    }

    /// <summary>Rank for a module: the first rank_pattern key matching it (PEFT's get_pattern_key), else r.</summary>
    public int RankFor(string key) => PatternValue(RankPattern, key) ?? R;

    public double AlphaFor(string key) => PatternValue(AlphaPattern, key) ?? LoraAlpha;

    static T? PatternValue<T>(IReadOnlyDictionary<string, T> patterns, string key) where T : struct
    {
        foreach (var (pattern, value) in patterns)
            if (Regex.IsMatch(key, $@"^(.*\.)?({pattern})$")) return value;
        return null;
    }

    public double Scaling(string key)
    {
        int r = RankFor(key);
        double alpha = AlphaFor(key);
        return UseRslora ? alpha / Math.Sqrt(r) : alpha / r;
    }

    // ---- adapter_config.json ----

    public static LoraConfig Load(string adapterDir)
    {
        var path = Path.Combine(adapterDir, "adapter_config.json");
        if (!File.Exists(path)) throw new LoraConfigException($"{adapterDir}: adapter_config.json not found");
        try
        {
            var obj = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new LoraConfigException($"{path}: not a JSON object");
            return FromJson(obj);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
        {
            throw new LoraConfigException($"{path}: {e.Message}");
        }
    }

    static readonly HashSet<string> Known =
    [
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "init_lora_weights",
        "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "modules_to_save",
        "base_model_name_or_path", "task_type",
    ];

    public static LoraConfig FromJson(JsonObject o)
    {
        var extra = new JsonObject();
        foreach (var (k, v) in o) if (!Known.Contains(k)) extra[k] = v?.DeepClone();
        var (targets, regex) = o["target_modules"] switch
        {
            null => (DefaultTargets, (string?)null),
            JsonArray a => (a.Select(x => x!.GetValue<string>()).ToList(), null),
            JsonValue v => (null, v.GetValue<string>()),
            _ => throw new LoraConfigException("target_modules must be a list, a string or null"),
        };
        return new LoraConfig
        {
            R = o["r"]?.GetValue<int>() ?? 8,
            LoraAlpha = o["lora_alpha"]?.GetValue<double>() ?? 8,
            LoraDropout = o["lora_dropout"]?.GetValue<double>() ?? 0,
            TargetModules = targets,
            TargetRegex = regex is not null && regex.Equals(AllLinear, StringComparison.OrdinalIgnoreCase) ? AllLinear : regex,
            ExcludeModules = StringList(o["exclude_modules"]),
            UseRslora = o["use_rslora"]?.GetValue<bool>() ?? false,
            InitLoraWeights = o["init_lora_weights"] switch
            {
                null => "true",
                JsonValue v when v.TryGetValue<bool>(out var b) => b ? "true" : "false",
                JsonValue v => v.GetValue<string>().ToLowerInvariant(),
                _ => "true",
            },
            LayersToTransform = o["layers_to_transform"] switch
            {
                null => null,
                JsonArray a => a.Select(x => x!.GetValue<int>()).ToList(),
                JsonValue v => [v.GetValue<int>()],
                _ => null,
            },
            LayersPattern = StringList(o["layers_pattern"]),
            RankPattern = (o["rank_pattern"] as JsonObject)?.ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<int>()) ?? new Dictionary<string, int>(),
            AlphaPattern = (o["alpha_pattern"] as JsonObject)?.ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<double>()) ?? new Dictionary<string, double>(),
            Bias = o["bias"]?.GetValue<string>() ?? "none",
            ModulesToSave = StringList(o["modules_to_save"]),
            BaseModelNameOrPath = o["base_model_name_or_path"]?.GetValue<string>(),
            TaskType = o["task_type"]?.GetValue<string>() ?? "CAUSAL_LM",
            Extra = extra,
        };
    }

    static IReadOnlyList<string>? StringList(JsonNode? n) => n switch
    {
        null => null,
        JsonArray a => a.Select(x => x!.GetValue<string>()).ToList(),
        JsonValue v => [v.GetValue<string>()],
        _ => null,
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
            ["use_dora"] = false,
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

public sealed class LoraConfigException(string message) : LoraKitException(message);
