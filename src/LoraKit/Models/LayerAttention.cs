namespace LoraKit.Models;

/// <summary>
/// Which layers attend within a sliding window, as each family's transformers config decides it: Mistral and Phi-3 all
/// layers (when sliding_window is set), Qwen2/3 from max_window_layers or layer_types (when use_sliding_window), Gemma 2
/// every other layer from the first, Gemma 3 five of every six (sliding_window_pattern), both unless layer_types lists them.
/// </summary>
internal static class LayerAttention
{
    /// <summary>Per layer: the window (null = full attention) and the layer type ("full_attention" / "sliding_attention").</summary>
    public static (int?[] Windows, string[] Types) Parse(ConfigReader r, string arch, int layers)
    {
        var windows = arch is "Gemma2ForCausalLM" or "Gemma3ForCausalLM" ? Gemma(r, arch, layers) : Windows(r, arch, layers);
        var types = windows.Select(w => w is null ? RopeConfigParser.Full : RopeConfigParser.Sliding).ToArray();
        return (windows, types);
    }

    static int?[] Windows(ConfigReader r, string arch, int layers)
    {
        int? window = r.OptInt("sliding_window");
        var result = new int?[layers];
        if (window is null or <= 0) return result;
        switch (arch)
        {
            case "MistralForCausalLM" or "Phi3ForCausalLM": // MistralModel (and Phi3Model, built on it) masks every layer
                Array.Fill(result, window);
                return result;
            case "Qwen2ForCausalLM" or "Qwen3ForCausalLM":
                if (!(r.OptBool("use_sliding_window") ?? false)) return result;
                // transformers: layers at index >= max_window_layers use the window (or an explicit layer_types list).
                if (r.Object["layer_types"] is System.Text.Json.Nodes.JsonArray { Count: var n } && n == layers)
                {
                    var types = r.OptStrings("layer_types")!;
                    for (int i = 0; i < layers; i++) result[i] = types[i] == RopeConfigParser.Sliding ? window : null;
                    return result;
                }
                int maxWindowLayers = r.OptInt("max_window_layers") ?? layers;
                for (int i = 0; i < layers; i++) result[i] = i >= maxWindowLayers ? window : null;
                return result;
            default:
                throw r.Error($"sliding_window is not supported for {arch}");
        }
    }

    static int?[] Gemma(ConfigReader r, string arch, int layers)
    {
        var types = r.OptStrings("layer_types");
        if (types != null)
        {
            if (types.Length != layers)
                throw r.Error($"field 'layer_types' lists {types.Length} layers, but num_hidden_layers is {layers}");
            foreach (var t in types)
                if (t is not (RopeConfigParser.Full or RopeConfigParser.Sliding))
                    throw r.Error($"unsupported layer type '{t}' in 'layer_types' (supported: {RopeConfigParser.Full}, {RopeConfigParser.Sliding})");
        }
        else
        {
            // Gemma2Config: sliding when (i + 1) % 2; Gemma3TextConfig: when (i + 1) % sliding_window_pattern (default 6).
            int pattern = arch == "Gemma2ForCausalLM" ? 2 : r.OptInt("sliding_window_pattern") ?? 6;
            if (pattern <= 0) throw r.Error($"field 'sliding_window_pattern' must be positive, got {pattern}");
            types = Enumerable.Range(0, layers).Select(i => (i + 1) % pattern != 0 ? RopeConfigParser.Sliding : RopeConfigParser.Full).ToArray();
        }
        bool anySliding = types.Contains(RopeConfigParser.Sliding);
        if (anySliding && r.IsExplicitNull("sliding_window"))
            throw r.Error($"field 'sliding_window' is null, but layer_types has sliding layers");
        int window = r.OptInt("sliding_window") ?? 4096; // both configuration classes default to 4096
        if (anySliding && window <= 0) throw r.Error($"field 'sliding_window' must be positive, got {window}");
        return types.Select(t => t == RopeConfigParser.Sliding ? window : (int?)null).ToArray();
    }
}
