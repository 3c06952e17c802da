using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.IO;

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
        ModelDirectory.Require(modelDir);
        var path = Path.Combine(modelDir, "config.json");
        if (!File.Exists(path)) throw new ModelConfigException(path, "config.json not found");
        var raw = JsonFiles.ParseNode(path) as JsonObject ?? throw new ModelConfigException(path, "config.json is not a JSON object");
        return Parse(raw, path);
    }

    public static ModelConfig Parse(JsonObject raw, string source = "config.json")
    {
        var r = new Reader(raw, source);
        if (raw["architectures"] is not JsonArray archs || archs.Count == 0)
            throw new ModelConfigException(source, raw["architectures"] is null
                ? "no 'architectures' entry; cannot tell which model this is"
                : $"field 'architectures' must be a non-empty list of class names, got {JsonFiles.KindOf(raw["architectures"])}");
        string arch = archs[0] is JsonValue av && av.TryGetValue<string>(out var a0) ? a0
            : throw new ModelConfigException(source, $"field 'architectures' must list class names (strings), got {JsonFiles.KindOf(archs[0])}");
        if (!SupportedArchitectures.Contains(arch))
            throw new ModelConfigException(source, $"unsupported architecture '{arch}' (supported: {string.Join(", ", SupportedArchitectures)})");
        string modelType = r.Str("model_type") ?? "";

        int hidden = r.Int("hidden_size");
        int heads = r.Int("num_attention_heads");
        if (heads <= 0) throw new ModelConfigException(source, $"field 'num_attention_heads' must be positive, got {heads}");
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
        if (layers <= 0 || layers > MaxLayers)
            throw new ModelConfigException(source, $"field 'num_hidden_layers' must be between 1 and {MaxLayers}, got {layers}");
        int vocab = r.Int("vocab_size");
        if (vocab <= 0) throw new ModelConfigException(source, $"field 'vocab_size' must be positive, got {vocab}");
        int intermediate = r.Int("intermediate_size");
        if (intermediate <= 0) throw new ModelConfigException(source, $"field 'intermediate_size' must be positive, got {intermediate}");
        double eps = r.OptDouble("rms_norm_eps") ?? 1e-6;
        if (!(eps > 0) || double.IsInfinity(eps))
            throw new ModelConfigException(source, $"field 'rms_norm_eps' must be a positive number, got {eps}");
        int maxPos = r.OptInt("max_position_embeddings") ?? 4096;
        if (maxPos <= 0) throw new ModelConfigException(source, $"field 'max_position_embeddings' must be positive, got {maxPos}");
        var eos = IntList(raw["eos_token_id"], "eos_token_id", source);
        foreach (var id in eos) CheckTokenId("eos_token_id", id, vocab, source);
        int? bos = r.OptInt("bos_token_id");
        if (bos is int b) CheckTokenId("bos_token_id", b, vocab, source);
        int? pad = r.OptInt("pad_token_id");
        if (pad >= vocab) throw new ModelConfigException(source, $"field 'pad_token_id' is {pad}, outside the vocabulary (vocab_size {vocab})");
        bool isQwen2 = arch == "Qwen2ForCausalLM";
        bool isQwen3 = arch == "Qwen3ForCausalLM";
        bool attnBias = r.OptBool("attention_bias") ?? false;

        return new ModelConfig
        {
            Architecture = arch,
            ModelType = modelType,
            VocabSize = vocab,
            HiddenSize = hidden,
            IntermediateSize = intermediate,
            NumHiddenLayers = layers,
            NumAttentionHeads = heads,
            NumKeyValueHeads = kvHeads,
            HeadDim = headDim,
            RmsNormEps = eps,
            RopeTheta = theta,
            RopeScaling = scaling,
            TieWordEmbeddings = r.OptBool("tie_word_embeddings") ?? false,
            QkvBias = isQwen2 || attnBias,
            OProjBias = !isQwen2 && attnBias,
            MlpBias = arch == "LlamaForCausalLM" && (r.OptBool("mlp_bias") ?? false),
            QkNorm = isQwen3,
            SlidingWindows = ParseSlidingWindows(raw, r, arch, layers, source),
            MaxPositionEmbeddings = maxPos,
            EosTokenIds = eos,
            BosTokenId = bos,
            PadTokenId = pad,
            Raw = raw,
        };
    }

    /// <summary>No released decoder has more than a few hundred layers; the bound keeps a typo from allocating gigabytes.</summary>
    public const int MaxLayers = 10_000;

    static void CheckTokenId(string field, int id, int vocab, string source)
    {
        if (id < 0 || id >= vocab)
            throw new ModelConfigException(source, $"field '{field}' is {id}, outside the vocabulary (ids 0..{vocab - 1})");
    }

    static (double theta, Llama3RopeScaling? scaling) ParseRope(JsonObject raw, Reader r, string source)
    {
        // transformers ≥5 writes "rope_parameters"; older files write rope_theta + "rope_scaling".
        foreach (var key in (string[])["rope_parameters", "rope_scaling"])
            if (raw[key] is { } n && n is not JsonObject)
                throw new ModelConfigException(source, $"field '{key}' must be an object (or null), got {JsonFiles.KindOf(n)}");
        var ropeParams = raw["rope_parameters"] as JsonObject;
        var ropeScaling = raw["rope_scaling"] as JsonObject;
        var p = ropeParams ?? ropeScaling;
        string where = p == null ? "" : ropeParams != null ? "rope_parameters." : "rope_scaling.";
        double theta = (p != null ? new Reader(p, source, where).OptDouble("rope_theta") : null) ?? r.OptDouble("rope_theta") ?? 10000.0;
        if (!(theta > 0) || double.IsInfinity(theta))
            throw new ModelConfigException(source, $"field 'rope_theta' must be a positive number, got {theta}");
        if (p == null) return (theta, null);
        var pr = new Reader(p, source, where);
        string type = pr.Str("rope_type") ?? pr.Str("type") ?? "default";
        switch (type)
        {
            case "default": return (theta, null);
            case "llama3":
            {
                var s = new Llama3RopeScaling(pr.Double("factor"), pr.Double("low_freq_factor"),
                    pr.Double("high_freq_factor"), pr.Int("original_max_position_embeddings"));
                if (!(s.Factor > 0) || !(s.LowFreqFactor > 0) || !(s.HighFreqFactor > 0) || s.OriginalMaxPositionEmbeddings <= 0
                    || double.IsInfinity(s.Factor) || double.IsInfinity(s.LowFreqFactor) || double.IsInfinity(s.HighFreqFactor))
                    throw new ModelConfigException(source, $"{where}factor, low_freq_factor, high_freq_factor and original_max_position_embeddings must be positive");
                if (s.HighFreqFactor == s.LowFreqFactor)
                    throw new ModelConfigException(source, $"{where}high_freq_factor must differ from low_freq_factor (llama3 rope divides by their difference)");
                return (theta, s);
            }
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
                        result[i] = types[i] is JsonValue tv && tv.TryGetValue<string>(out var lt) ? (lt == "sliding_attention" ? window : null)
                            : throw new ModelConfigException(source, $"field 'layer_types' must list strings, got {JsonFiles.KindOf(types[i])} at index {i}");
                    return result;
                }
                int maxWindowLayers = r.OptInt("max_window_layers") ?? layers;
                for (int i = 0; i < layers; i++) result[i] = i >= maxWindowLayers ? window : null;
                return result;
            default:
                throw new ModelConfigException(source, $"sliding_window is not supported for {arch}");
        }
    }

    static int[] IntList(JsonNode? n, string key, string source)
    {
        var items = n switch
        {
            null => [],
            JsonArray a => a.ToArray(),
            _ => [n],
        };
        return items.Where(x => x != null).Select(x => ToInt(x, key, source)
            ?? throw new ModelConfigException(source, $"field '{key}' must be an integer or a list of integers, got {JsonFiles.KindOf(x)}")).ToArray();
    }

    static int? ToInt(JsonNode? n, string key, string source)
    {
        if (n is not JsonValue v || v.GetValueKind() != JsonValueKind.Number) return null;
        if (v.TryGetValue<int>(out var i)) return i;
        if (v.TryGetValue<double>(out var d) && d == Math.Floor(d))
            return d is >= int.MinValue and <= int.MaxValue ? (int)d
                : throw new ModelConfigException(source, $"field '{key}' is {d}, too large for an integer");
        return null;
    }

    /// <summary>Typed, error-naming access to JSON fields; null (or absent) means "not set", anything of the wrong type is an error.</summary>
    sealed class Reader(JsonObject o, string source, string prefix = "")
    {
        JsonValue? Val(string key, string expected)
        {
            var n = o[key];
            if (n is null) return null;
            if (n is JsonValue v && v.GetValueKind() != JsonValueKind.Null) return v;
            if (n is JsonValue) return null;
            throw Wrong(key, expected, n);
        }

        ModelConfigException Wrong(string key, string expected, JsonNode? n) =>
            new(source, $"field '{prefix}{key}' must be {expected}, got {JsonFiles.KindOf(n)}" + (n is JsonValue ? $" ({n.ToJsonString()})" : ""));

        public string? Str(string key)
        {
            var v = Val(key, "a string");
            if (v == null) return null;
            return v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : throw Wrong(key, "a string", v);
        }

        public int Int(string key) => OptInt(key) ?? throw new ModelConfigException(source, $"missing required field '{prefix}{key}'");

        public double Double(string key) => OptDouble(key) ?? throw new ModelConfigException(source, $"missing required field '{prefix}{key}'");

        public int? OptInt(string key)
        {
            var v = Val(key, "an integer");
            if (v == null) return null;
            return ToInt(v, prefix + key, source) ?? throw Wrong(key, "an integer", v);
        }

        public double? OptDouble(string key)
        {
            var v = Val(key, "a number");
            if (v == null) return null;
            return v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<double>(out var d) ? d : throw Wrong(key, "a number", v);
        }

        public bool? OptBool(string key)
        {
            var v = Val(key, "true or false");
            if (v == null) return null;
            return v.GetValueKind() is JsonValueKind.True or JsonValueKind.False ? v.GetValue<bool>() : throw Wrong(key, "true or false", v);
        }
    }
}

public sealed class ModelConfigException(string path, string problem) : LoraKitException($"{path}: {problem}");
