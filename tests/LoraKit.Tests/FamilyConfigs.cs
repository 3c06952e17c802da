using System.Text.Json.Nodes;

namespace LoraKit.Tests;

/// <summary>
/// config.json files as the Hugging Face Hub serves them for one model of each described family (field names and values
/// as published: transformers 4.x key names such as rope_scaling, rope_local_base_freq, sliding_window_pattern), and
/// the same settings in the form transformers 5 writes (rope_parameters). The longrope factor lists have the published
/// length (48 = 0.75 · 128 / 2) but synthetic values.
/// </summary>
public static class FamilyConfigs
{
    public const string Phi3Mini = """
    {
      "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1,
      "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
      "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
      "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "pad_token_id": 32000,
      "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0, "sliding_window": 2047,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": true,
      "vocab_size": 32064
    }
    """;

    public const string Phi4Mini = """
    {
      "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 199999,
      "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
      "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": false,
      "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "phi3", "num_attention_heads": 24,
      "num_hidden_layers": 32, "num_key_value_heads": 8, "original_max_position_embeddings": 4096, "pad_token_id": 199999,
      "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
      "rope_scaling": {
        "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5, 14.0, 14.5, 15.0, 15.5, 16.0, 16.5, 17.0, 17.5, 18.0, 18.5, 19.0, 19.5, 20.0, 20.5, 21.0, 21.5, 22.0, 22.5, 23.0, 23.5, 24.0, 24.5],
        "short_factor": [1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.14, 1.16, 1.18, 1.2, 1.22, 1.24, 1.26, 1.28, 1.3, 1.32, 1.34, 1.36, 1.38, 1.4, 1.42, 1.44, 1.46, 1.48, 1.5, 1.52, 1.54, 1.56, 1.58, 1.6, 1.62, 1.64, 1.66, 1.68, 1.7, 1.72, 1.74, 1.76, 1.78, 1.8, 1.82, 1.84, 1.86, 1.88, 1.9, 1.92, 1.94],
        "type": "longrope"
      },
      "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.45.0", "use_cache": true, "vocab_size": 200064
    }
    """;

    public const string Gemma2_2b = """
    {
      "architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
      "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
      "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
      "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
      "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
      "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
      "use_cache": true, "vocab_size": 256000
    }
    """;

    public const string Gemma3_1b = """
    {
      "architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
      "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
      "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
      "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null,
      "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
      "transformers_version": "4.50.0.dev0", "use_cache": true, "vocab_size": 262144
    }
    """;

    /// <summary>name -> Hub config.json text.</summary>
    public static readonly IReadOnlyDictionary<string, string> Hub = new Dictionary<string, string>
    {
        ["phi3-mini"] = Phi3Mini, ["phi4-mini"] = Phi4Mini, ["gemma2-2b"] = Gemma2_2b, ["gemma3-1b"] = Gemma3_1b,
    };

    public static JsonObject Parse(string json) => (JsonObject)JsonNode.Parse(json)!;

    /// <summary>
    /// The Gemma 3 4B text settings (linear RoPE scaling, factor 8, on the full layers) in the form transformers 5 writes:
    /// rope_parameters keyed by layer type; <paramref name="hubForm"/> gives the older form (rope_scaling, rope_theta,
    /// rope_local_base_freq) of the same settings.
    /// </summary>
    public static JsonObject Gemma3Scaled(bool hubForm)
    {
        var c = Parse(Gemma3_1b);
        if (hubForm)
        {
            c["rope_scaling"] = new JsonObject { ["factor"] = 8.0, ["rope_type"] = "linear" };
            return c;
        }
        foreach (var k in new[] { "rope_scaling", "rope_theta", "rope_local_base_freq", "sliding_window_pattern" }) c.Remove(k);
        c["layer_types"] = new JsonArray(Enumerable.Range(0, 26).Select(i => (JsonNode)((i + 1) % 6 != 0 ? "sliding_attention" : "full_attention")).ToArray());
        c["rope_parameters"] = JsonNode.Parse("""
            {"full_attention": {"factor": 8.0, "rope_theta": 1000000.0, "rope_type": "linear"},
             "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
            """);
        return c;
    }

    /// <summary>Phi-4-mini in the form transformers 5 writes: partial_rotary_factor and original_max_position_embeddings copied into rope_parameters.</summary>
    public static JsonObject Phi4MiniV5()
    {
        var c = Parse(Phi4Mini);
        var p = (JsonObject)c["rope_scaling"]!.DeepClone();
        c.Remove("rope_scaling");
        c.Remove("rope_theta");
        p.Remove("type");
        p["rope_type"] = "longrope";
        p["rope_theta"] = 10000.0;
        p["partial_rotary_factor"] = 0.75;
        p["original_max_position_embeddings"] = 4096;
        c["rope_parameters"] = p;
        return c;
    }
}
