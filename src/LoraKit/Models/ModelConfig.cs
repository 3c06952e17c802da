using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Models;

/// <summary>Llama-3 style RoPE frequency scaling ("rope_type": "llama3").</summary>
public sealed record Llama3RopeScaling(double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositionEmbeddings);

/// <summary>
/// The fields of an HF <c>config.json</c> that the decoder-only family (Llama, Mistral, Qwen2, Qwen3) needs.
/// Property names follow HF so the mapping reads one-to-one. <see cref="Load"/> rejects anything LoraKit would
/// compute differently from transformers, naming the setting.
/// </summary>
public sealed record ModelConfig
{
    public static readonly IReadOnlyList<string> SupportedArchitectures =
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"];

    public required string Architecture { get; init; }
    public required string ModelType { get; init; }
    public required int VocabSize { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int NumHiddenLayers { get; init; }
    public required int NumAttentionHeads { get; init; }
    public required int NumKeyValueHeads { get; init; }
    public required int HeadDim { get; init; }
    public required double RmsNormEps { get; init; }
    public required double RopeTheta { get; init; }
    public Llama3RopeScaling? RopeScaling { get; init; }
    public required bool TieWordEmbeddings { get; init; }
    /// <summary>Bias on q/k/v (Qwen2 always; Llama when attention_bias, which also biases o_proj).</summary>
    public bool QkvBias { get; init; }
    public bool OProjBias { get; init; }
    public bool MlpBias { get; init; }
    /// <summary>RMSNorm on each head's q and k before RoPE (Qwen3).</summary>
    public bool QkNorm { get; init; }
    /// <summary>Per-layer sliding-window size, null for full attention.</summary>
    public required int?[] SlidingWindows { get; init; }
    public int MaxPositionEmbeddings { get; init; }
    public int[] EosTokenIds { get; init; } = [];
    public int? BosTokenId { get; init; }
    public int? PadTokenId { get; init; }
    /// <summary>The raw JSON, kept so a merged checkpoint can write the same config back.</summary>
    public JsonObject Raw { get; init; } = new();

    public static ModelConfig Load(string modelDir)
    {
        var path = Path.Combine(modelDir, "config.json");
        if (!File.Exists(path)) throw new ModelConfigException(path, "config.json not found");
        JsonObject raw;
        try { raw = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new ModelConfigException(path, "config.json is not a JSON object"); }
        catch (JsonException e) { throw new ModelConfigException(path, $"config.json is not valid JSON ({e.Message})"); }
        return Parse(raw, path);
    }

    public static ModelConfig Parse(JsonObject raw, string source = "config.json")
    {
        var r = new Reader(raw, source);
        var archs = raw["architectures"] as JsonArray;
        string arch = archs?.FirstOrDefault()?.GetValue<string>()
            ?? throw new ModelConfigException(source, "no 'architectures' entry; cannot tell which model this is");
        if (!SupportedArchitectures.Contains(arch))
            throw new ModelConfigException(source, $"unsupported architecture '{arch}' (supported: {string.Join(", ", SupportedArchitectures)})");
        string modelType = r.Str("model_type") ?? "";

        int hidden = r.Int("hidden_size");
        int heads = r.Int("num_attention_heads");
        int kvHeads = r.OptInt("num_key_value_heads") ?? heads;
        int headDim = r.OptInt("head_dim") ?? hidden / heads;
        if (hidden <= 0 || heads <= 0 || kvHeads <= 0 || headDim <= 0)
            throw new ModelConfigException(source, "hidden_size, num_attention_heads, num_key_value_heads and head_dim must be positive");
        if (heads % kvHeads != 0)
            throw new ModelConfigException(source, $"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kvHeads})");
        if (headDim % 2 != 0) throw new ModelConfigException(source, $"head_dim {headDim} must be even for rotary embeddings");

        string act = r.Str("hidden_act") ?? "silu";
        if (act != "silu") throw new ModelConfigException(source, $"unsupported hidden_act '{act}' (only 'silu')");
        if (r.OptInt("pretraining_tp") is int tp && tp != 1)
            throw new ModelConfigException(source, $"unsupported pretraining_tp {tp} (only 1)");

        var (theta, scaling) = ParseRope(raw, r, source);
        int layers = r.Int("num_hidden_layers");
        bool isQwen2 = arch == "Qwen2ForCausalLM";
        bool isQwen3 = arch == "Qwen3ForCausalLM";
        bool attnBias = r.OptBool("attention_bias") ?? false;

        return new ModelConfig
        {
            Architecture = arch,
            ModelType = modelType,
            VocabSize = r.Int("vocab_size"),
            HiddenSize = hidden,
            IntermediateSize = r.Int("intermediate_size"),
            NumHiddenLayers = layers,
            NumAttentionHeads = heads,
            NumKeyValueHeads = kvHeads,
            HeadDim = headDim,
            RmsNormEps = r.OptDouble("rms_norm_eps") ?? 1e-6,
            RopeTheta = theta,
            RopeScaling = scaling,
            TieWordEmbeddings = r.OptBool("tie_word_embeddings") ?? false,
            QkvBias = isQwen2 || attnBias,
            OProjBias = !isQwen2 && attnBias,
            MlpBias = arch == "LlamaForCausalLM" && (r.OptBool("mlp_bias") ?? false),
            QkNorm = isQwen3,
            SlidingWindows = ParseSlidingWindows(raw, r, arch, layers, source),
            MaxPositionEmbeddings = r.OptInt("max_position_embeddings") ?? 4096,
            EosTokenIds = IntList(raw["eos_token_id"]),
            BosTokenId = r.OptInt("bos_token_id"),
            PadTokenId = r.OptInt("pad_token_id"),
            Raw = raw,
        };
    }

    static (double theta, Llama3RopeScaling? scaling) ParseRope(JsonObject raw, Reader r, string source)
    {
        // transformers ≥5 writes "rope_parameters"; older files write rope_theta + "rope_scaling".
        var ropeParams = raw["rope_parameters"] as JsonObject;
        var ropeScaling = raw["rope_scaling"] as JsonObject;
        var p = ropeParams ?? ropeScaling;
        double theta = (p != null ? new Reader(p, source).OptDouble("rope_theta") : null) ?? r.OptDouble("rope_theta") ?? 10000.0;
        if (p == null) return (theta, null);
        var pr = new Reader(p, source);
        string type = pr.Str("rope_type") ?? pr.Str("type") ?? "default";
        switch (type)
        {
            case "default": return (theta, null);
            case "llama3":
                return (theta, new Llama3RopeScaling(pr.Double("factor"), pr.Double("low_freq_factor"),
                    pr.Double("high_freq_factor"), pr.Int("original_max_position_embeddings")));
            default:
                throw new ModelConfigException(source, $"unsupported rope scaling type '{type}' (supported: default, llama3)");
        }
    }

    static int?[] ParseSlidingWindows(JsonObject raw, Reader r, string arch, int layers, string source)
    {
        int? window = r.OptInt("sliding_window");
        var result = new int?[layers];
        if (window is null or <= 0) return result;
        switch (arch)
        {
            case "MistralForCausalLM":
                Array.Fill(result, window);
                return result;
            case "Qwen2ForCausalLM" or "Qwen3ForCausalLM":
                if (!(r.OptBool("use_sliding_window") ?? false)) return result;
                // transformers: layers at index >= max_window_layers use the window (or an explicit layer_types list).
                if (raw["layer_types"] is JsonArray types && types.Count == layers)
                {
                    for (int i = 0; i < layers; i++)
                        result[i] = types[i]?.GetValue<string>() == "sliding_attention" ? window : null;
                    return result;
                }
                int maxWindowLayers = r.OptInt("max_window_layers") ?? layers;
                for (int i = 0; i < layers; i++) result[i] = i >= maxWindowLayers ? window : null;
                return result;
            default:
                throw new ModelConfigException(source, $"sliding_window is not supported for {arch}");
        }
    }

    static int[] IntList(JsonNode? n) => n switch
    {
        null => [],
        JsonArray a => a.Where(x => x != null).Select(x => x!.GetValue<int>()).ToArray(),
        JsonValue v => [v.GetValue<int>()],
        _ => [],
    };

    /// <summary>Typed, error-naming access to JSON fields.</summary>
    sealed class Reader(JsonObject o, string source)
    {
        JsonValue? Val(string key) => o[key] as JsonValue;

        public string? Str(string key) => Val(key)?.TryGetValue<string>(out var s) == true ? s : null;

        public int Int(string key) => OptInt(key) ?? throw new ModelConfigException(source, $"missing required field '{key}'");

        public double Double(string key) => OptDouble(key) ?? throw new ModelConfigException(source, $"missing required field '{key}'");

        public int? OptInt(string key)
        {
            var v = Val(key);
            if (v == null) return null;
            if (v.TryGetValue<int>(out var i)) return i;
            if (v.TryGetValue<double>(out var d) && d == Math.Floor(d)) return (int)d;
            throw new ModelConfigException(source, $"field '{key}' must be an integer");
        }

        public double? OptDouble(string key)
        {
            var v = Val(key);
            if (v == null) return null;
            return v.TryGetValue<double>(out var d) ? d : throw new ModelConfigException(source, $"field '{key}' must be a number");
        }

        public bool? OptBool(string key)
        {
            var v = Val(key);
            if (v == null) return null;
            return v.TryGetValue<bool>(out var b) ? b : throw new ModelConfigException(source, $"field '{key}' must be true or false");
        }
    }
}

public sealed class ModelConfigException(string path, string problem) : LoraKitException($"{path}: {problem}");
