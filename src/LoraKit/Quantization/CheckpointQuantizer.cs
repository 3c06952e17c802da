using System.Text.Json.Nodes;
using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// Quantizes a full-precision Hugging Face checkpoint directory into a bitsandbytes-format one (what
/// <c>lorakit quantize</c> writes; transformers + bitsandbytes load it as it is). Tensors are read one at a time on the
/// CPU in their stored dtype and each quantizable linear weight (<see cref="BnbCheckpointWriter.DefaultQuantizable"/>:
/// the same layers quantize-on-load packs) is replaced by its packed storage before the next is read, so the
/// full-precision model is never held whole; the output (about a quarter of bf16 for 4-bit) is written at the end
/// through <see cref="HfCheckpointWriter"/> (temporary directory, then rename). The codes are the ones quantize-on-load
/// computes for the same options, so a model loaded from the output equals one quantized on load.
/// </summary>
public static class CheckpointQuantizer
{
    /// <summary>
    /// Writes <paramref name="outDir"/> (new or empty) from <paramref name="modelDir"/>; a checkpoint that is already
    /// quantized is refused. Returns the number of weights quantized.
    /// </summary>
    /// <param name="progress">called after each tensor with (tensors done, tensors in all, its name); null: silent</param>
    public static int Quantize(string modelDir, string outDir, BnbQuantizeOptions options, Action<int, int, string>? progress = null)
    {
        options.Validate();
        OutputDirectory.EnsureNewOrEmpty(outDir); // before minutes of work
        var configPath = Path.Combine(modelDir, "config.json");
        var config = ReadConfig(configPath);
        if (config.ContainsKey("quantization_config"))
            throw new LoraKitException($"{configPath}: the checkpoint is already quantized (it has a quantization_config); quantize its full-precision original");
        using var files = CheckpointFiles.Open(modelDir);
        if (BnbCheckpoint.QuantizedWeights(files).Count > 0)
            throw new LoraKitException($"{modelDir}: the checkpoint already holds bitsandbytes-quantized weights; quantize its full-precision original");
        var tensors = new List<(string key, Tensor tensor)>();
        int quantized = 0;
        try
        {
            var names = files.Names.OrderBy(n => n, StringComparer.Ordinal).ToList();
            int done = 0;
            foreach (var name in names)
            {
                progress?.Invoke(done++, names.Count, name);
                var t = files.ReadStored(name);
                if (!BnbCheckpointWriter.DefaultQuantizable(name, t)) { tensors.Add((name, t)); continue; }
                using (t)
                {
                    if (!t.is_floating_point()) throw new SafetensorsException(files.PathOf(name), $"tensor '{name}' is not floating point; only F32, BF16 or F16 weights are quantized");
                    using var scope = NewDisposeScope();
                    foreach (var (k, q) in BnbCheckpointWriter.QuantizeTensors([(name, t)], options)) tensors.Add((k, q.MoveToOuterDisposeScope()));
                }
                quantized++;
            }
            var cfg = (JsonObject)config.DeepClone();
            progress?.Invoke(names.Count, names.Count, "");
            cfg["quantization_config"] = BnbCheckpointWriter.QuantizationConfig(options);
            HfCheckpointWriter.Write(outDir, cfg, tensors, modelDir);
        }
        finally
        {
            foreach (var (_, t) in tensors) t.Dispose();
        }
        return quantized;
    }

    static JsonObject ReadConfig(string path) =>
        JsonFiles.ParseNode(path) as JsonObject ?? throw new LoraKitException($"{path}: config.json is not a JSON object");

    /// <summary>The torch dtype name a checkpoint's config.json declares ("dtype" or the older "torch_dtype"), when it is a float type bnb computes in.</summary>
    public static string? DeclaredDtype(string modelDir)
    {
        var config = ReadConfig(Path.Combine(modelDir, "config.json"));
        var name = (config["dtype"] ?? config["torch_dtype"]) is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
        return name is "float32" or "bfloat16" or "float16" ? name : null;
    }
}
