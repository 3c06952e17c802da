using System.Text.Json.Nodes;

namespace LoraKit.Quantization;

/// <summary>How to quantize a checkpoint: "nf4", "fp4" or "int8"; double quantization and block size apply to 4-bit.</summary>
/// <param name="Method">nf4, fp4 or int8.</param>
/// <param name="DoubleQuant">Quantize the 4-bit absmax again (bnb_4bit_use_double_quant).</param>
/// <param name="Blocksize">Values per 4-bit absmax block (32 … 4096).</param>
/// <param name="ComputeDtype">The torch dtype name written as bnb_4bit_compute_dtype ("bfloat16", "float16", "float32").</param>
public sealed record BnbQuantizeOptions(string Method = "nf4", bool DoubleQuant = true, int Blocksize = 64, string ComputeDtype = "bfloat16")
{
    /// <summary>Rejects a method, block size or compute dtype bitsandbytes would not accept.</summary>
    public void Validate()
    {
        if (Method is not ("nf4" or "fp4" or "int8")) throw new LoraKitException($"quantization method '{Method}' is not nf4, fp4 or int8");
        if (!QuantState.ValidBlocksizes.Contains(Blocksize))
            throw new LoraKitException($"quantization blocksize {Blocksize} is not one bitsandbytes supports ({string.Join(", ", QuantState.ValidBlocksizes)})");
        if (ComputeDtype is not ("bfloat16" or "float16" or "float32")) throw new LoraKitException($"compute dtype '{ComputeDtype}' is not bfloat16, float16 or float32");
    }

    /// <summary>
    /// The safetensors metadata key under which an adapter records the quantization of the base it was trained against
    /// (absent: a full-precision base). Merge reads it to rebuild the weights the adapter actually saw.
    /// </summary>
    public const string AdapterMetadataKey = "lorakit_quantization";

    /// <summary>The options as the adapter metadata stores them: {"method","blocksize","double_quant","compute_dtype"}.</summary>
    public string ToJson() => new JsonObject
    {
        ["method"] = Method, ["blocksize"] = Blocksize, ["double_quant"] = DoubleQuant, ["compute_dtype"] = ComputeDtype,
    }.ToJsonString();

    /// <summary>Reads <see cref="ToJson"/>'s form; a malformed value is an error naming <paramref name="where"/>.</summary>
    public static BnbQuantizeOptions FromJson(string json, string where)
    {
        try
        {
            var o = JsonNode.Parse(json)?.AsObject() ?? throw new FormatException("not an object");
            var opts = new BnbQuantizeOptions(
                o["method"]?.GetValue<string>() ?? throw new FormatException("no method"),
                o["double_quant"]?.GetValue<bool>() ?? true,
                o["blocksize"]?.GetValue<int>() ?? 64,
                o["compute_dtype"]?.GetValue<string>() ?? "bfloat16");
            opts.Validate();
            return opts;
        }
        catch (Exception e) when (e is FormatException or InvalidOperationException or System.Text.Json.JsonException)
        {
            throw new LoraKitException($"{where}: {AdapterMetadataKey} is not a quantization record ({e.Message})");
        }
    }
}
