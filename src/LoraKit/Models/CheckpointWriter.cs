using System.Text.Json.Nodes;
using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// Writes a model as a Hugging Face checkpoint directory transformers can load: its config.json (with the dtype it is
/// saved in), its parameters under their checkpoint keys (no lm_head when tied), the tokenizer/generation files copied
/// from the source model. The files themselves are <see cref="HfCheckpointWriter"/>'s; a model wrapped by adapters is
/// written through the adapter layer, which maps its parameter names back to the base model's keys (keyOf).
/// </summary>
public static class CheckpointWriter
{
    /// <param name="model">the model whose parameters are written</param>
    /// <param name="sourceDir">the directory it was loaded from (tokenizer and generation files are copied from it)</param>
    /// <param name="outDir">a new or empty directory</param>
    /// <param name="maxShardBytes">above this size the safetensors are sharded, with an index</param>
    /// <param name="editConfig">changes config.json before it is written (e.g. a classifier's architecture and labels)</param>
    /// <param name="head">tensors that replace lm_head.weight (e.g. a classifier's score.weight), or null to keep it</param>
    /// <param name="checkpointKey">maps a parameter name to its checkpoint key, null to leave the parameter out; null = names as they are</param>
    public static void Save(CausalLM model, string sourceDir, string outDir, long maxShardBytes = 5L << 30,
        Action<JsonObject>? editConfig = null, IReadOnlyDictionary<string, Tensor>? head = null, Func<string, string?>? checkpointKey = null)
    {
        var (config, tensors) = Parts(model, editConfig, head, checkpointKey);
        HfCheckpointWriter.Write(outDir, config, tensors, sourceDir, maxShardBytes);
    }

    /// <summary>
    /// What <see cref="Save"/> writes, before it is written: config.json (its dtype <paramref name="saveAs"/>, default the
    /// model's) and the tensors under their checkpoint keys — the model's parameters themselves, or new tensors converted to
    /// <paramref name="saveAs"/> (in the caller's dispose scope). Callers that transform the tensors (re-quantization) start here.
    /// </summary>
    public static (JsonObject config, List<(string key, Tensor tensor)> tensors) Parts(CausalLM model, Action<JsonObject>? editConfig = null,
        IReadOnlyDictionary<string, Tensor>? head = null, Func<string, string?>? checkpointKey = null, ScalarType? saveAs = null)
    {
        // Packed layers are buffers, not parameters: writing parameters alone would drop them silently.
        if (model.Quantization is not null)
            throw new LoraKitException("cannot write a checkpoint from a model with a quantized (packed) base: its linear weights are not dense parameters; dequantize into a new checkpoint instead");
        var dtype = saveAs ?? model.DType;
        var config = (JsonObject)model.Config.Raw.DeepClone();
        config["dtype"] = dtype switch
        {
            ScalarType.BFloat16 => "bfloat16",
            ScalarType.Float16 => "float16",
            _ => "float32",
        };
        config.Remove("torch_dtype");
        editConfig?.Invoke(config);
        var tensors = new List<(string key, Tensor tensor)>();
        foreach (var (name, p) in model.named_parameters())
        {
            if ((checkpointKey is null ? name : checkpointKey(name)) is not string key) continue;
            if (key == "lm_head.weight" && (model.Config.TieWordEmbeddings || head != null)) continue;
            tensors.Add((key, p.dtype == dtype ? p : p.detach().to(dtype)));
        }
        if (head != null) tensors.AddRange(head.Select(kv => (kv.Key, kv.Value)));
        return (config, tensors);
    }
}
