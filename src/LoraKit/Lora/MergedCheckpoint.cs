using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Runtime;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// A model with LoRA wrappers written as the plain base checkpoint transformers loads (what PEFT's
/// <c>merge_and_unload()</c> + <c>save_pretrained</c> give): the LoRA naming is undone here, so IO and Models never
/// learn it — a wrapped layer's <c>base_layer</c> segment is dropped and adapter tensors (<c>lora_*</c>) are left out.
/// Merge the adapter first (<see cref="LoraModel.Merge"/>); every written weight is checked finite.
/// </summary>
public static class MergedCheckpoint
{
    /// <summary>The checkpoint key of a parameter of a wrapped model; null for an adapter's own tensors.</summary>
    public static string? CheckpointKey(string parameterName)
    {
        foreach (var segment in parameterName.Split('.'))
            if (segment.StartsWith("lora_", StringComparison.Ordinal)) return null;
        return parameterName.Replace(".base_layer.", ".", StringComparison.Ordinal);
    }

    /// <summary>The config.json key holding a merge's provenance.</summary>
    public const string ProvenanceKey = "lorakit_merge";

    /// <summary>
    /// Writes <paramref name="lm"/>'s base weights (with whatever adapters are merged into them) to the new or empty
    /// <paramref name="outDir"/>, copying tokenizer and generation files from <paramref name="sourceDir"/>; a non-finite
    /// weight refuses the whole write. <paramref name="editConfig"/> and <paramref name="head"/> as for <see cref="CheckpointWriter.Save"/>.
    /// </summary>
    public static void Save(LoraModel lm, string sourceDir, string outDir, Action<JsonObject>? editConfig = null,
        IReadOnlyDictionary<string, Tensor>? head = null, long maxShardBytes = 5L << 30)
    {
        foreach (var (name, p) in lm.Model.named_parameters())
            if (CheckpointKey(name) is string key) AdapterFiles.CheckFinite(p, key, $"merged model (not written to {outDir})", double.PositiveInfinity);
        CheckpointWriter.Save(lm.Model, sourceDir, outDir, maxShardBytes, editConfig, head, CheckpointKey);
    }

    /// <summary>
    /// <c>lorakit merge</c>'s work: loads the base from <paramref name="modelDir"/> at <paramref name="placement"/>, the
    /// adapter from <paramref name="adapterDir"/>, merges it and writes the checkpoint to <paramref name="outDir"/> (checked
    /// writable before minutes of loading and merging).
    /// </summary>
    /// <paramref name="provenance"/>, when given, is written into config.json as <c>lorakit_merge</c> (what was merged,
    /// under which gate); transformers keeps unknown config keys as attributes and ignores them otherwise.
    /// <paramref name="progress"/>, when given, hears the three phases (load, merge, write) as (done, 3, phase).
    public static void Merge(string modelDir, string adapterDir, string outDir, Placement placement, AdapterLoadOptions? options = null,
        JsonObject? provenance = null, Action<int, int, string>? progress = null)
    {
        OutputDirectory.EnsureNewOrEmpty(outDir);
        progress?.Invoke(0, 3, "load the base and the adapter");
        using var lm = new LoraModel(CausalLM.Load(modelDir, placement.DType, placement.Device));
        AdapterFiles.Load(lm, "default", adapterDir, options);
        progress?.Invoke(1, 3, "merge");
        lm.Merge("default");
        progress?.Invoke(2, 3, "write the checkpoint");
        Save(lm, modelDir, outDir, provenance is null ? null : c => c[ProvenanceKey] = provenance.DeepClone());
        progress?.Invoke(3, 3, "");
    }
}
