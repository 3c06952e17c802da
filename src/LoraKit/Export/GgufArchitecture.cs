using System.Text.RegularExpressions;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Export;

/// <summary>
/// How one LoraKit architecture maps onto a llama.cpp architecture, as llama.cpp's convert_hf_to_gguf.py maps it:
/// the <c>general.architecture</c> name, the hyper-parameter keys, the tensor names (<c>token_embd</c>,
/// <c>blk.N.attn_q</c>, …) and the reshapes of the weights (the Llama family's q/k row permutation, which turns HF's
/// rotate-half RoPE layout into the interleaved pairs llama.cpp's "normal" RoPE rotates).
/// </summary>
public sealed class GgufArchitecture
{
    /// <summary>llama.cpp's name for the architecture (<c>general.architecture</c> and the hyper-parameter key prefix).</summary>
    public string Name { get; }
    /// <summary>The model's config.</summary>
    public ModelConfig Config { get; }
    /// <summary>Llama and Mistral: q/k rows are permuted (llama.cpp's LLAMA rope type); Qwen and Phi-3 use NEOX RoPE, as HF.</summary>
    public bool PermuteQk { get; }

    GgufArchitecture(string name, ModelConfig config, bool permuteQk) { Name = name; Config = config; PermuteQk = permuteQk; }

    /// <summary>The mapping for <paramref name="config"/>, or a one-line error naming what llama.cpp cannot run.</summary>
    public static GgufArchitecture For(ModelConfig config)
    {
        var arch = config.Architecture switch
        {
            "LlamaForCausalLM" or "MistralForCausalLM" => new GgufArchitecture("llama", config, true),
            "Qwen2ForCausalLM" => new GgufArchitecture("qwen2", config, false),
            "Qwen3ForCausalLM" => new GgufArchitecture("qwen3", config, false),
            "Phi3ForCausalLM" => new GgufArchitecture("phi3", config, false),
            // llama.cpp takes Gemma's attention scale from the model size (head_dim^-½ except at 27B), not from
            // query_pre_attn_scalar, and fixes Gemma 3's sliding-window pattern at 6: an export would run a different model
            // whenever those differ, and LoraKit cannot check that from llama.cpp's side.
            "Gemma2ForCausalLM" or "Gemma3ForCausalLM" => throw new GgufExportException(
                $"{config.Architecture} is not exported to GGUF yet (llama.cpp fixes Gemma's attention scale and sliding pattern by model size; supported: {Supported})"),
            _ => throw new GgufExportException($"{config.Architecture} cannot be exported to GGUF (supported: {Supported})"),
        };
        arch.CheckRope();
        return arch;
    }

    /// <summary>The architectures <see cref="For"/> maps.</summary>
    public const string Supported = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM";

    void CheckRope()
    {
        var scaling = Config.RopeFor(0).Scaling;
        bool ok = scaling switch
        {
            null => true,
            Llama3RopeScaling => Name == "llama",
            LongRopeScaling => Name == "phi3",
            _ => false,
        };
        if (!ok) throw new GgufExportException($"{Config.Architecture} with {scaling!.GetType().Name.Replace("RopeScaling", "").ToLowerInvariant()} RoPE scaling cannot be exported to GGUF");
    }

    /// <summary>The hyper-parameters under <c>{arch}.</c>, as convert_hf_to_gguf.py writes them for this architecture.</summary>
    public void WriteHyperParameters(GgufWriter w)
    {
        var c = Config;
        var rope = c.RopeFor(0);
        w.Add($"{Name}.context_length", (uint)c.MaxPositionEmbeddings);
        w.Add($"{Name}.embedding_length", (uint)c.HiddenSize);
        w.Add($"{Name}.block_count", (uint)c.NumHiddenLayers);
        w.Add($"{Name}.feed_forward_length", (uint)c.IntermediateSize);
        w.Add($"{Name}.attention.head_count", (uint)c.NumAttentionHeads);
        w.Add($"{Name}.attention.head_count_kv", (uint)c.NumKeyValueHeads);
        w.Add($"{Name}.attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
        w.Add($"{Name}.rope.freq_base", (float)rope.Theta);
        w.Add($"{Name}.rope.dimension_count", (uint)rope.RotaryDim);
        w.Add($"{Name}.attention.key_length", (uint)c.HeadDim);
        w.Add($"{Name}.attention.value_length", (uint)c.HeadDim);
        if (Name == "llama") w.Add($"{Name}.vocab_size", (uint)c.VocabSize);
        if (Name == "phi3")
        {
            int orig = rope.Scaling is LongRopeScaling lr ? lr.OriginalMaxPositionEmbeddings
                : (int?)c.Raw["original_max_position_embeddings"]?.GetValue<double>() ?? c.MaxPositionEmbeddings;
            w.Add($"{Name}.rope.scaling.original_context_length", (uint)orig);
            w.Add($"{Name}.attention.sliding_window", (uint)(c.SlidingWindows[0] ?? 0));
            if (rope.Scaling is LongRopeScaling l) w.Add($"{Name}.rope.scaling.attn_factor", (float)l.AttentionFactor);
        }
    }

    /// <summary>
    /// Tensors convert_hf_to_gguf.py adds that the checkpoint does not hold: Llama 3's per-frequency RoPE divisors
    /// (<c>rope_freqs.weight</c>) and LongRoPE's short and long factors.
    /// </summary>
    public IEnumerable<(string name, float[] values)> ExtraTensors()
    {
        var rope = Config.RopeFor(0);
        switch (rope.Scaling)
        {
            case Llama3RopeScaling s:
                yield return ("rope_freqs.weight", Llama3Factors(s, rope.Theta, rope.RotaryDim));
                break;
            case LongRopeScaling l:
                yield return ("rope_factors_long.weight", l.LongFactor.Select(x => (float)x).ToArray());
                yield return ("rope_factors_short.weight", l.ShortFactor.Select(x => (float)x).ToArray());
                break;
        }
    }

    /// <summary>
    /// Llama 3 RoPE as divisors of each inverse frequency (llama.cpp divides θᵢ by them): 1 for short wavelengths,
    /// factor for long ones, a smooth blend between (transformers' _compute_llama3_parameters).
    /// </summary>
    static float[] Llama3Factors(Llama3RopeScaling s, double theta, int dim)
    {
        double lowWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
        double highWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
        var factors = new float[dim / 2];
        for (int i = 0; i < factors.Length; i++)
        {
            double freq = 1.0 / Math.Pow(theta, 2.0 * i / dim);
            double wavelen = 2 * Math.PI / freq;
            if (wavelen < highWavelen) factors[i] = 1;
            else if (wavelen > lowWavelen) factors[i] = (float)s.Factor;
            else
            {
                double smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                factors[i] = (float)(1 / ((1 - smooth) / s.Factor + smooth));
            }
        }
        return factors;
    }

    static readonly Regex LayerKey = new(@"^model\.layers\.(\d+)\.(.+)$", RegexOptions.CultureInvariant);

    static readonly Dictionary<string, string> LayerNames = new(StringComparer.Ordinal)
    {
        ["input_layernorm"] = "attn_norm",
        ["post_attention_layernorm"] = "ffn_norm",
        ["self_attn.q_proj"] = "attn_q",
        ["self_attn.k_proj"] = "attn_k",
        ["self_attn.v_proj"] = "attn_v",
        ["self_attn.o_proj"] = "attn_output",
        ["self_attn.qkv_proj"] = "attn_qkv",
        ["self_attn.q_norm"] = "attn_q_norm",
        ["self_attn.k_norm"] = "attn_k_norm",
        ["mlp.gate_proj"] = "ffn_gate",
        ["mlp.up_proj"] = "ffn_up",
        ["mlp.down_proj"] = "ffn_down",
        ["mlp.gate_up_proj"] = "ffn_up", // Phi-3: llama.cpp's SwiGLU splits [gate; up] rows as HF does
    };

    /// <summary>llama.cpp's name for the HF checkpoint key <paramref name="key"/> (e.g. <c>blk.0.attn_q.weight</c>).</summary>
    public static string TensorName(string key)
    {
        switch (key)
        {
            case "model.embed_tokens.weight": return "token_embd.weight";
            case "model.norm.weight": return "output_norm.weight";
            case "lm_head.weight": return "output.weight";
        }
        var m = LayerKey.Match(key);
        int dot = m.Success ? m.Groups[2].Value.LastIndexOf('.') : -1;
        if (dot > 0 && LayerNames.TryGetValue(m.Groups[2].Value[..dot], out var name))
            return $"blk.{m.Groups[1].Value}.{name}{m.Groups[2].Value[dot..]}";
        throw new GgufExportException($"checkpoint tensor '{key}' has no GGUF name");
    }

    /// <summary>
    /// A weight (or bias, or LoRA B) of module <paramref name="key"/> with its output rows reordered for llama.cpp: the
    /// Llama family's q and k rows go from HF's [first halves; second halves] per head to interleaved pairs
    /// (convert_hf_to_gguf's LlamaModel.permute, with the kv head count for k). Other tensors are returned as they are.
    /// </summary>
    public Tensor Reorder(string key, Tensor rows)
    {
        if (!PermuteQk) return rows;
        int heads = key.Contains(".self_attn.q_proj", StringComparison.Ordinal) ? Config.NumAttentionHeads
            : key.Contains(".self_attn.k_proj", StringComparison.Ordinal) ? Config.NumKeyValueHeads : 0;
        if (heads == 0) return rows;
        var shape = rows.shape;
        var rest = shape.Skip(1).ToArray();
        return rows.reshape([heads, 2, shape[0] / heads / 2, .. rest]).swapaxes(1, 2).reshape(shape);
    }
}
