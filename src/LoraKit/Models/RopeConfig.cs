namespace LoraKit.Models;

/// <summary>
/// Rotary embedding settings of one layer type: base θ, how many leading dimensions of each head rotate, and an optional
/// frequency scaling. Families with one RoPE use the same instance for every layer type; Gemma 3 has a local one for
/// its sliding layers and a global one (possibly scaled) for its full layers.
/// </summary>
/// <param name="Theta">rope_theta (Gemma 3's sliding layers: rope_local_base_freq).</param>
/// <param name="RotaryDim">int(head_dim · partial_rotary_factor): the first RotaryDim dimensions rotate, the rest pass through.</param>
/// <param name="Scaling">null for plain RoPE.</param>
public sealed record RopeConfig(double Theta, int RotaryDim, RopeScaling? Scaling);

/// <summary>A RoPE frequency scaling ("rope_type" in rope_parameters / rope_scaling).</summary>
public abstract record RopeScaling;

/// <summary>Llama-3 style RoPE frequency scaling ("rope_type": "llama3").</summary>
public sealed record Llama3RopeScaling(double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositionEmbeddings) : RopeScaling;

/// <summary>Linear scaling ("rope_type": "linear"): every inverse frequency divided by <paramref name="Factor"/> (Gemma 3's full layers).</summary>
public sealed record LinearRopeScaling(double Factor) : RopeScaling;

/// <summary>
/// LongRoPE ("rope_type": "longrope"; Phi-3.5 / Phi-4-mini): inverse frequencies divided per dimension by the short
/// factors, or by the long factors once a forward's largest position + 1 exceeds
/// <paramref name="OriginalMaxPositionEmbeddings"/> (transformers decides per forward call, for the whole batch);
/// cos and sin are multiplied by <paramref name="AttentionFactor"/>.
/// </summary>
public sealed record LongRopeScaling(IReadOnlyList<double> ShortFactor, IReadOnlyList<double> LongFactor,
    int OriginalMaxPositionEmbeddings, double AttentionFactor) : RopeScaling;

/// <summary>Reads the RoPE settings of config.json in both the transformers-5 form (rope_parameters) and the older one.</summary>
internal static class RopeConfigParser
{
    public const string Full = ModelConfig.FullAttention;
    public const string Sliding = ModelConfig.SlidingAttention;
    const string Supported = "default, linear, llama3, longrope";

    /// <summary>
    /// One RopeConfig per layer type. <paramref name="perLayerType"/>: Gemma 3, whose rope_parameters are keyed by layer
    /// type (or, in older files, rope_theta + rope_scaling for full layers and rope_local_base_freq for sliding ones).
    /// </summary>
    public static Dictionary<string, RopeConfig> Parse(ConfigReader r, string arch, int headDim, int maxPos, bool perLayerType,
        double defaultTheta, double defaultLocalTheta)
    {
        var ropeParams = r.OptObject("rope_parameters");
        var ropeScaling = r.OptObject("rope_scaling");
        int rotaryDim = RotaryDim(r, ropeParams, arch, headDim);
        if (!perLayerType)
        {
            // transformers ≥5 writes "rope_parameters"; older files write rope_theta + "rope_scaling".
            var p = ropeParams ?? ropeScaling;
            if (p != null && (p.Has(Full) || p.Has(Sliding)))
                throw r.Error($"RoPE parameters per layer type are supported for Gemma3ForCausalLM only, not {arch}");
            double theta = Theta(p?.OptDouble("rope_theta") ?? r.OptDouble("rope_theta") ?? defaultTheta, r, "rope_theta");
            var one = new RopeConfig(theta, rotaryDim, Scaling(p, r, arch, rotaryDim, maxPos));
            return new() { [Full] = one, [Sliding] = one };
        }
        if (ropeParams != null && !ropeParams.Has(Full) && !ropeParams.Has(Sliding))
            throw r.Error($"field 'rope_parameters' of {arch} must be keyed by layer type ({Full}, {Sliding})");
        if (ropeParams != null && ropeScaling != null)
            throw r.Error("both 'rope_parameters' and 'rope_scaling' are set; transformers merges them: write one");
        var full = ropeParams?.OptObject(Full) ?? ropeScaling;
        var sliding = ropeParams?.OptObject(Sliding);
        return new()
        {
            [Full] = new RopeConfig(Theta(full?.OptDouble("rope_theta") ?? r.OptDouble("rope_theta") ?? defaultTheta, r, "rope_theta"),
                rotaryDim, Scaling(full, r, arch, rotaryDim, maxPos)),
            // Older files: the sliding layers' base is rope_local_base_freq.
            [Sliding] = new RopeConfig(Theta(sliding?.OptDouble("rope_theta") ?? r.OptDouble("rope_local_base_freq") ?? defaultLocalTheta, r,
                    sliding is null ? "rope_local_base_freq" : "rope_parameters.sliding_attention.rope_theta"),
                rotaryDim, Scaling(sliding, r, arch, rotaryDim, maxPos)),
        };
    }

    static double Theta(double theta, ConfigReader r, string key)
    {
        if (!Fp32Positive(theta))
            throw r.Error($"field '{key}' must be a positive number (within float32's range), got {theta}");
        return theta;
    }

    /// <summary>The tables are computed in fp32 as transformers does: a value that rounds to 0 or ∞ there gives NaN tables.</summary>
    static bool Fp32Positive(double x) => (float)x > 0 && float.IsFinite((float)x);

    /// <summary>Phi-3's partial_rotary_factor, at the top level (Hub files) or in rope_parameters (transformers 5).</summary>
    static int RotaryDim(ConfigReader r, ConfigReader? ropeParams, string arch, int headDim)
    {
        double? top = r.OptDouble("partial_rotary_factor"), inner = ropeParams?.OptDouble("partial_rotary_factor");
        if (top is double a && inner is double b && a != b)
            throw r.Error($"partial_rotary_factor ({a}) and rope_parameters.partial_rotary_factor ({b}) disagree");
        double factor = top ?? inner ?? 1.0;
        if (factor != 1.0 && arch != "Phi3ForCausalLM")
            throw r.Error($"partial_rotary_factor {factor} is supported for Phi3ForCausalLM only");
        if (!(factor > 0 && factor <= 1))
            throw r.Error($"field 'partial_rotary_factor' must be in (0, 1], got {factor}");
        int dim = (int)(headDim * factor); // Python's int(): truncation, as transformers computes it
        if (dim < 2 || dim % 2 != 0)
            throw r.Error($"partial_rotary_factor {factor} gives {dim} rotary dimensions of head_dim {headDim}; they must be even and at least 2");
        return dim;
    }

    static RopeScaling? Scaling(ConfigReader? p, ConfigReader top, string arch, int rotaryDim, int maxPos)
    {
        if (p == null) return null;
        string where = p.Prefix;
        string type = p.Str("rope_type") ?? p.Str("type") ?? "default";
        // Phi3Config renames the early Phi-3 names ("su", and "yarn" as Phi-3 used it) to longrope.
        if (arch == "Phi3ForCausalLM" && type is "su" or "yarn") type = "longrope";
        switch (type)
        {
            case "default": return null;
            case "linear":
            {
                double factor = p.OptPositive("factor") ?? throw p.Error($"missing required field '{where}factor'");
                return Fp32Positive(factor) ? new LinearRopeScaling(factor)
                    : throw p.Error($"field '{where}factor' must be within float32's range, got {factor}");
            }
            case "llama3":
            {
                var s = new Llama3RopeScaling(p.Double("factor"), p.Double("low_freq_factor"), p.Double("high_freq_factor"),
                    p.Int("original_max_position_embeddings"));
                if (!(s.Factor > 0) || !(s.LowFreqFactor > 0) || !(s.HighFreqFactor > 0) || s.OriginalMaxPositionEmbeddings <= 0
                    || double.IsInfinity(s.Factor) || double.IsInfinity(s.LowFreqFactor) || double.IsInfinity(s.HighFreqFactor))
                    throw p.Error($"{where}factor, low_freq_factor, high_freq_factor and original_max_position_embeddings must be positive");
                if (s.HighFreqFactor == s.LowFreqFactor)
                    throw p.Error($"{where}high_freq_factor must differ from low_freq_factor (llama3 rope divides by their difference)");
                return s;
            }
            case "longrope": return LongRope(p, top, arch, rotaryDim, maxPos);
            default:
                throw p.Error($"unsupported rope scaling type '{type}' (supported: {Supported})");
        }
    }

    static LongRopeScaling LongRope(ConfigReader p, ConfigReader top, string arch, int rotaryDim, int maxPos)
    {
        string where = p.Prefix;
        var shortF = p.OptNumbers("short_factor") ?? throw p.Error($"missing required field '{where}short_factor'");
        var longF = p.OptNumbers("long_factor") ?? throw p.Error($"missing required field '{where}long_factor'");
        foreach (var (name, f) in new[] { ("short_factor", shortF), ("long_factor", longF) })
        {
            if (f.Length != rotaryDim / 2)
                throw p.Error($"field '{where}{name}' must have {rotaryDim / 2} entries (rotary dimensions / 2), got {f.Length}");
            if (!f.All(Fp32Positive))
                throw p.Error($"field '{where}{name}' must list positive numbers (within float32's range)");
        }
        // Phi3Config always has original_max_position_embeddings (default 4096) and transformers gives it priority over
        // the one in rope_parameters; other configs fall back to max_position_embeddings.
        int? inner = p.OptInt("original_max_position_embeddings");
        int original;
        if (arch == "Phi3ForCausalLM")
        {
            original = top.OptInt("original_max_position_embeddings") ?? 4096;
            if (inner is int i && i != original)
                throw p.Error($"{where}original_max_position_embeddings ({i}) differs from original_max_position_embeddings ({original}), which transformers uses");
        }
        else original = inner ?? maxPos;
        if (original < 2) throw p.Error($"original_max_position_embeddings must be at least 2, got {original}");
        double factor = p.OptPositive("factor") ?? (double)maxPos / original;
        double attention = p.OptDouble("attention_factor")
            ?? (factor <= 1.0 ? 1.0 : Math.Sqrt(1 + Math.Log(factor) / Math.Log(original)));
        if (!(attention > 0) || double.IsInfinity(attention))
            throw p.Error($"field '{where}attention_factor' must be a positive number, got {attention}");
        return new LongRopeScaling(shortF, longF, original, attention);
    }
}
