using System.Text.Json.Nodes;
using LoraKit.IO;

namespace LoraKit.Models;

/// <summary>How an RMSNorm applies its weight.</summary>
public enum NormKind
{
    /// <summary>Llama, Mistral, Qwen, Phi-3: normalise in fp32, cast to the activations' dtype, multiply by w.</summary>
    Weight,
    /// <summary>Gemma 2/3: normalise and multiply by (1 + w) in fp32, then cast (the weight is stored centred on 0).</summary>
    OnePlusWeight,
}

/// <summary>The MLP's gate activation.</summary>
public enum Activation
{
    /// <summary>"silu": SwiGLU (Llama, Mistral, Qwen, Phi-3).</summary>
    Silu,
    /// <summary>"gelu_pytorch_tanh": GeGLU with the tanh approximation of GELU (Gemma 2/3).</summary>
    GeluTanh,
}

/// <summary>
/// The fields of an HF <c>config.json</c> that LoraKit's decoder-only families need, and the architecture described as
/// data (norm kind, activation, embedding scale, attention scaling and soft-capping, norms per layer, fused projections,
/// per-layer attention type and RoPE), so the reference modules read these fields instead of branching on names.
/// Property names follow HF so the mapping reads one-to-one. <see cref="Parse(JsonObject, string, bool)"/> rejects
/// anything LoraKit would compute differently from transformers, naming the setting, and applies each family's own
/// defaults (transformers' configuration classes) for absent fields.
/// </summary>
public sealed record ModelConfig
{
    /// <summary>Architectures that <see cref="CausalLM"/> builds.</summary>
    public static readonly IReadOnlyList<string> SupportedArchitectures =
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"];

    /// <summary>
    /// Architectures whose config.json is described (parsed and validated) but whose modules are not built yet: loading
    /// one is refused as unsupported. They move to <see cref="SupportedArchitectures"/> when their modules land.
    /// </summary>
    public static readonly IReadOnlyList<string> DescribedArchitectures = [];

    /// <summary>The layer types of <see cref="LayerTypes"/> (transformers' names).</summary>
    public const string FullAttention = "full_attention", SlidingAttention = "sliding_attention";

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
    /// <summary>θ of the full-attention layers' RoPE (see <see cref="Rope"/> for every layer type).</summary>
    public required double RopeTheta { get; init; }
    /// <summary>The full-attention layers' Llama-3 scaling, if that is their scaling (see <see cref="Rope"/>).</summary>
    public Llama3RopeScaling? RopeScaling { get; init; }
    public required bool TieWordEmbeddings { get; init; }
    /// <summary>Bias on q/k/v (Qwen2 always; Llama and Gemma when attention_bias, which also biases o_proj).</summary>
    public bool QkvBias { get; init; }
    public bool OProjBias { get; init; }
    public bool MlpBias { get; init; }
    /// <summary>RMSNorm on each head's q and k before RoPE (Qwen3, Gemma 3).</summary>
    public bool QkNorm { get; init; }
    /// <summary>Per-layer sliding-window size, null for full attention.</summary>
    public required int?[] SlidingWindows { get; init; }
    public int MaxPositionEmbeddings { get; init; }
    public int[] EosTokenIds { get; init; } = [];
    public int? BosTokenId { get; init; }
    public int? PadTokenId { get; init; }
    /// <summary>The raw JSON, kept so a merged checkpoint can write the same config back.</summary>
    public JsonObject Raw { get; init; } = new();

    // ---- the architecture as data (defaults are the Llama family's) ----

    /// <summary>How every RMSNorm (layer, final and q/k norms) applies its weight.</summary>
    public NormKind Norm { get; init; } = NormKind.Weight;
    /// <summary>The MLP's gate activation: hidden_act (Llama, Qwen, Phi-3) or hidden_activation (Gemma).</summary>
    public Activation HiddenAct { get; init; } = Activation.Silu;
    /// <summary>
    /// Gemma: the embeddings are multiplied by √hidden_size, the scalar first rounded to the model's dtype as transformers
    /// does (bf16 turns √2304 = 48 into 48, √3072 = 55.43 into 55.5); null: no scaling.
    /// </summary>
    public double? EmbeddingScale { get; init; }
    /// <summary>Attention scores' scale: query_pre_attn_scalar^-½ (Gemma), else head_dim^-½.</summary>
    public required double AttentionScale { get; init; }
    /// <summary>Gemma 2: scores become cap·tanh(scores / cap) before the mask and softmax (attn_logit_softcapping); null: none.</summary>
    public double? AttnLogitSoftcap { get; init; }
    /// <summary>Gemma 2: logits become cap·tanh(logits / cap) (final_logit_softcapping); null: none.</summary>
    public double? FinalLogitSoftcap { get; init; }
    /// <summary>
    /// Gemma 2/3: four norms per layer. input_layernorm before attention, post_attention_layernorm on the attention's
    /// output before the residual add, pre_feedforward_layernorm before the MLP and post_feedforward_layernorm on its
    /// output. (Without: post_attention_layernorm is the norm before the MLP, as in Llama.)
    /// </summary>
    public bool PostNorms { get; init; }
    /// <summary>Phi-3: one qkv_proj whose output rows are q, then k, then v.</summary>
    public bool FusedQkv { get; init; }
    /// <summary>Phi-3: one gate_up_proj whose output rows are gate, then up.</summary>
    public bool FusedGateUp { get; init; }
    /// <summary>Per layer: "full_attention" or "sliding_attention" (the key of <see cref="Rope"/>; windows in <see cref="SlidingWindows"/>).</summary>
    public required string[] LayerTypes { get; init; }
    /// <summary>RoPE per layer type (both keys are always present; one family-wide RoPE is the same instance twice).</summary>
    public required IReadOnlyDictionary<string, RopeConfig> Rope { get; init; }

    /// <summary>The RoPE of layer <paramref name="layer"/>.</summary>
    public RopeConfig RopeFor(int layer) => Rope[LayerTypes[layer]];

    public static ModelConfig Load(string modelDir)
    {
        ModelDirectory.Require(modelDir);
        var path = Path.Combine(modelDir, "config.json");
        if (!File.Exists(path)) throw new ModelConfigException(path, "config.json not found");
        var raw = JsonFiles.ParseNode(path) as JsonObject ?? throw new ModelConfigException(path, "config.json is not a JSON object");
        return Parse(raw, path);
    }

    /// <summary>Parses and validates a config.json object.</summary>
    /// <param name="describedToo">Also accept <see cref="DescribedArchitectures"/> (whose modules are not built yet): for
    /// tests and tools that only read the description.</param>
    public static ModelConfig Parse(JsonObject raw, string source = "config.json", bool describedToo = false)
    {
        var r = new ConfigReader(raw, source);
        string arch = Architecture_(raw, source, describedToo);
        var family = Family.Of(arch);
        string modelType = r.Str("model_type") ?? "";

        int hidden = r.Int("hidden_size");
        int heads = r.Int("num_attention_heads");
        if (heads <= 0) throw new ModelConfigException(source, $"field 'num_attention_heads' must be positive, got {heads}");
        int kvHeads = r.OptInt("num_key_value_heads") ?? heads;
        int headDim = r.OptInt("head_dim") ?? family.HeadDimDefault ?? hidden / heads;
        if (hidden <= 0 || heads <= 0 || kvHeads <= 0 || headDim <= 0)
            throw new ModelConfigException(source, "hidden_size, num_attention_heads, num_key_value_heads and head_dim must be positive");
        if (heads % kvHeads != 0)
            throw new ModelConfigException(source, $"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kvHeads})");
        if (headDim % 2 != 0) throw new ModelConfigException(source, $"head_dim {headDim} must be even for rotary embeddings");

        var act = ParseActivation(r, family);
        if (r.OptInt("pretraining_tp") is int tp && tp != 1)
            throw new ModelConfigException(source, $"unsupported pretraining_tp {tp} (only 1)");
        if (r.OptBool("use_bidirectional_attention") == true)
            throw new ModelConfigException(source, "use_bidirectional_attention is not supported (LoraKit's models are causal)");

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
        int maxPos = r.OptInt("max_position_embeddings") ?? family.MaxPositionDefault;
        if (maxPos <= 0) throw new ModelConfigException(source, $"field 'max_position_embeddings' must be positive, got {maxPos}");
        var eos = IntList(raw["eos_token_id"], "eos_token_id", source);
        foreach (var id in eos) CheckTokenId("eos_token_id", id, vocab, source);
        int? bos = r.OptInt("bos_token_id");
        if (bos is int b) CheckTokenId("bos_token_id", b, vocab, source);
        int? pad = r.OptInt("pad_token_id");
        if (pad >= vocab) throw new ModelConfigException(source, $"field 'pad_token_id' is {pad}, outside the vocabulary (vocab_size {vocab})");
        bool isQwen2 = arch == "Qwen2ForCausalLM";
        bool attnBias = family.HasAttentionBias && (r.OptBool("attention_bias") ?? false);

        var (windows, types) = LayerAttention.Parse(r, arch, layers);
        var rope = RopeConfigParser.Parse(r, arch, headDim, maxPos, family.RopePerLayerType, family.RopeThetaDefault, 10_000.0);
        var full = rope[RopeConfigParser.Full];
        double queryScalar = family.Gemma ? r.OptPositive("query_pre_attn_scalar") ?? 256 : headDim;

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
            RopeTheta = full.Theta,
            RopeScaling = full.Scaling as Llama3RopeScaling,
            TieWordEmbeddings = r.OptBool("tie_word_embeddings") ?? family.TieDefault,
            QkvBias = isQwen2 || attnBias,
            OProjBias = !isQwen2 && attnBias,
            MlpBias = arch == "LlamaForCausalLM" && (r.OptBool("mlp_bias") ?? false),
            QkNorm = arch is "Qwen3ForCausalLM" or "Gemma3ForCausalLM",
            SlidingWindows = windows,
            MaxPositionEmbeddings = maxPos,
            EosTokenIds = eos,
            BosTokenId = bos,
            PadTokenId = pad,
            Raw = raw,
            Norm = family.Gemma ? NormKind.OnePlusWeight : NormKind.Weight,
            HiddenAct = act,
            EmbeddingScale = family.Gemma ? Math.Sqrt(hidden) : null,
            AttentionScale = 1.0 / Math.Sqrt(queryScalar),
            AttnLogitSoftcap = family.Gemma ? Softcap(r, "attn_logit_softcapping", family.AttnSoftcapDefault) : null,
            FinalLogitSoftcap = family.Gemma ? Softcap(r, "final_logit_softcapping", family.FinalSoftcapDefault) : null,
            PostNorms = family.Gemma,
            FusedQkv = family.Phi3,
            FusedGateUp = family.Phi3,
            LayerTypes = types,
            Rope = rope,
        };
    }

    /// <summary>No released decoder has more than a few hundred layers; the bound keeps a typo from allocating gigabytes.</summary>
    public const int MaxLayers = 10_000;

    static string Architecture_(JsonObject raw, string source, bool describedToo)
    {
        if (raw["architectures"] is not JsonArray archs || archs.Count == 0)
            throw new ModelConfigException(source, raw["architectures"] is null
                ? "no 'architectures' entry; cannot tell which model this is"
                : $"field 'architectures' must be a non-empty list of class names, got {JsonFiles.KindOf(raw["architectures"])}");
        string arch = archs[0] is JsonValue av && av.TryGetValue<string>(out var a0) ? a0
            : throw new ModelConfigException(source, $"field 'architectures' must list class names (strings), got {JsonFiles.KindOf(archs[0])}");
        if (!SupportedArchitectures.Contains(arch) && !(describedToo && DescribedArchitectures.Contains(arch)))
            throw new ModelConfigException(source, $"unsupported architecture '{arch}' (supported: {string.Join(", ", SupportedArchitectures)})");
        return arch;
    }

    /// <summary>Gemma reads hidden_activation (hidden_act, which Hub files also carry, is ignored by transformers); others hidden_act.</summary>
    static Activation ParseActivation(ConfigReader r, Family family)
    {
        string key = family.Gemma ? "hidden_activation" : "hidden_act";
        string act = r.Str(key) ?? (family.Gemma ? "gelu_pytorch_tanh" : "silu");
        return act switch
        {
            "silu" when !family.Gemma => Activation.Silu,
            "gelu_pytorch_tanh" when family.Gemma => Activation.GeluTanh,
            _ => throw r.Error($"unsupported {key} '{act}' (only '{(family.Gemma ? "gelu_pytorch_tanh" : "silu")}')"),
        };
    }

    /// <summary>A soft-cap: absent gives the family's default, an explicit null none (transformers' None).</summary>
    static double? Softcap(ConfigReader r, string key, double? familyDefault) =>
        r.IsExplicitNull(key) ? null : r.OptPositive(key) ?? familyDefault;

    static void CheckTokenId(string field, int id, int vocab, string source)
    {
        if (id < 0 || id >= vocab)
            throw new ModelConfigException(source, $"field '{field}' is {id}, outside the vocabulary (ids 0..{vocab - 1})");
    }

    static int[] IntList(JsonNode? n, string key, string source)
    {
        var items = n switch
        {
            null => [],
            JsonArray a => a.ToArray(),
            _ => [n],
        };
        return items.Where(x => x != null).Select(x => ConfigReader.ToInt(x, key, source)
            ?? throw new ModelConfigException(source, $"field '{key}' must be an integer or a list of integers, got {JsonFiles.KindOf(x)}")).ToArray();
    }

    /// <summary>What each family's configuration class defaults to, and which family-specific modules it has.</summary>
    sealed record Family(bool Gemma, bool Phi3, int? HeadDimDefault, bool TieDefault, int MaxPositionDefault, double RopeThetaDefault,
        bool RopePerLayerType, bool HasAttentionBias, double? AttnSoftcapDefault, double? FinalSoftcapDefault)
    {
        public static Family Of(string arch) => arch switch
        {
            // Gemma2Config: head_dim 256, tied, caps 50 / 30. Gemma3TextConfig: head_dim 256, tied, no caps, θ 1e6 / 1e4 local.
            "Gemma2ForCausalLM" => new(true, false, 256, true, 8192, 10_000.0, false, true, 50.0, 30.0),
            "Gemma3ForCausalLM" => new(true, false, 256, true, 131_072, 1_000_000.0, true, true, null, null),
            // Phi3Config: no attention_bias setting; head_dim = hidden / heads.
            "Phi3ForCausalLM" => new(false, true, null, false, 4096, 10_000.0, false, false, null, null),
            _ => new(false, false, null, false, 4096, 10_000.0, false, true, null, null),
        };
    }
}

/// <summary>An invalid or unsupported config.json, with a one-line message naming the file and field.</summary>
public sealed class ModelConfigException(string path, string problem) : LoraKitException($"{path}: {problem}");
