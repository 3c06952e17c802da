using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Runtime;

namespace LoraKit.Lora;

/// <summary>
/// <c>lorakit combine</c>'s work on files: loads a base and several adapter directories, combines them with
/// <see cref="AdapterCombiner"/> (PEFT's add_weighted_adapter) and saves the result as a PEFT adapter directory.
/// </summary>
public static class AdapterFileCombiner
{
    /// <summary>
    /// Combines <paramref name="inputs"/> (adapter directory, weight) on the base in <paramref name="modelDir"/> by
    /// <paramref name="method"/> (linear, cat or svd) into the new or empty <paramref name="outDir"/>; returns the combined
    /// adapter's config.
    /// </summary>
    public static LoraConfig Combine(string modelDir, IReadOnlyList<(string dir, double weight)> inputs, string method, int? svdRank,
        string outDir, Placement placement, AdapterLoadOptions? options = null)
    {
        OutputDirectory.EnsureNewOrEmpty(outDir);
        using var lm = new LoraModel(CausalLM.Load(modelDir, placement.DType, placement.Device));
        var names = inputs.Select((_, i) => $"in{i}").ToList();
        for (int i = 0; i < inputs.Count; i++) AdapterFiles.Load(lm, names[i], inputs[i].dir, options);
        AdapterCombiner.Combine(lm, names, inputs.Select(p => p.weight).ToList(), "combined", method, svdRank);
        AdapterFiles.Save(lm, "combined", outDir, modelDir);
        return lm.Configs["combined"];
    }
}
