using System.Text.Json.Nodes;
using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// Writes a checkpoint in the format transformers + bitsandbytes load as it is: each quantizable linear weight
/// <c>P.weight</c> becomes the packed uint8 tensor [(n+1)/2, 1] plus <c>P.weight.absmax</c>, <c>.quant_map</c>,
/// <c>.nested_absmax</c>, <c>.nested_quant_map</c> and <c>.quant_state.bitsandbytes__nf4|fp4</c> (4-bit), or int8
/// <c>P.weight</c> plus <c>P.SCB</c> and <c>P.weight_format</c> (int8); every other tensor is written unchanged; config.json
/// gains the <c>quantization_config</c> of transformers' <c>BitsAndBytesConfig.to_dict()</c>. Which weights are
/// quantized is the caller's choice (transformers quantizes every nn.Linear but the output embedding; see
/// <see cref="DefaultQuantizable"/>).
/// </summary>
public static class BnbCheckpointWriter
{
    /// <summary>
    /// A 2-D <c>*.weight</c> that is neither an embedding nor the LM head: the decoder's linear layers in LLaMA-style
    /// checkpoints (transformers keeps lm_head, and embeddings are not nn.Linear).
    /// </summary>
    public static bool DefaultQuantizable(string key, Tensor t) =>
        t.dim() == 2 && key.EndsWith(".weight", StringComparison.Ordinal) && !key.StartsWith("lm_head.", StringComparison.Ordinal)
        && !key.Contains("embed", StringComparison.Ordinal);

    /// <summary>The checkpoint tensors with the quantizable ones replaced by their bnb storage (new tensors; inputs untouched).</summary>
    public static List<(string key, Tensor tensor)> QuantizeTensors(IReadOnlyList<(string key, Tensor tensor)> tensors,
        BnbQuantizeOptions options, Func<string, Tensor, bool>? quantizable = null)
    {
        options.Validate();
        quantizable ??= DefaultQuantizable;
        var result = new List<(string, Tensor)>();
        foreach (var (key, t) in tensors)
        {
            if (!quantizable(key, t)) { result.Add((key, t)); continue; }
            if (options.Method == "int8")
            {
                var q = Int8RowWise.Quantize(t);
                var prefix = key[..^"weight".Length];
                result.Add((key, q.Weight));
                result.Add((prefix + "SCB", q.Scb));
                result.Add((prefix + "weight_format", tensor((byte)0))); // bnb: torch.tensor(0, dtype=torch.uint8), "row"
            }
            else
            {
                var q = Blockwise4Bit.Quantize(t, options.Method, options.Blocksize, options.DoubleQuant);
                result.Add((key, q.Data.reshape(-1, 1))); // bnb's packed shape [(n+1)/2, 1]
                result.Add((key + ".absmax", q.Absmax));
                result.Add((key + ".quant_map", q.QuantMap));
                if (q.NestedAbsmax is not null) result.Add((key + ".nested_absmax", q.NestedAbsmax));
                if (q.NestedQuantMap is not null) result.Add((key + ".nested_quant_map", q.NestedQuantMap));
                result.Add((key + "." + q.State.Key, q.State.ToTensor()));
            }
        }
        return result;
    }

    /// <summary>transformers' <c>BitsAndBytesConfig(...).to_dict()</c> for these options, as config.json stores it.</summary>
    public static JsonObject QuantizationConfig(BnbQuantizeOptions options)
    {
        bool four = options.Method != "int8";
        return new JsonObject
        {
            ["_load_in_4bit"] = four,
            ["_load_in_8bit"] = !four,
            ["bnb_4bit_compute_dtype"] = options.ComputeDtype,
            ["bnb_4bit_quant_storage"] = "uint8",
            ["bnb_4bit_quant_type"] = four ? options.Method : "fp4",
            ["bnb_4bit_use_double_quant"] = four && options.DoubleQuant,
            ["llm_int8_enable_fp32_cpu_offload"] = false,
            ["llm_int8_has_fp16_weight"] = false,
            ["llm_int8_skip_modules"] = null,
            ["llm_int8_threshold"] = JsonNode.Parse("6.0"), // a float in Python: BitsAndBytesConfig.post_init rejects the int 6
            ["load_in_4bit"] = four,
            ["load_in_8bit"] = !four,
            ["quant_method"] = "bitsandbytes",
        };
    }

    /// <summary>
    /// Writes the quantized checkpoint directory <paramref name="outDir"/> (new or empty): <paramref name="config"/> with
    /// quantization_config added, the quantized tensors, and the tokenizer side files of <paramref name="sideFilesFrom"/>.
    /// </summary>
    public static void Write(string outDir, JsonObject config, IReadOnlyList<(string key, Tensor tensor)> tensors,
        string? sideFilesFrom, BnbQuantizeOptions options, Func<string, Tensor, bool>? quantizable = null)
    {
        using var scope = NewDisposeScope();
        var quantized = QuantizeTensors(tensors, options, quantizable);
        var cfg = (JsonObject)config.DeepClone();
        cfg["quantization_config"] = QuantizationConfig(options);
        HfCheckpointWriter.Write(outDir, cfg, quantized, sideFilesFrom);
    }
}
