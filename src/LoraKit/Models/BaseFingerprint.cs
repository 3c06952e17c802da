using System.Security.Cryptography;
using System.Text;
using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// Identifies a base checkpoint, so an adapter LoraKit writes can be refused on any other base (issue 16, item 7).
/// sha256 over: the architecture essentials of config.json (type, sizes, layer/head counts, vocabulary, tying); every
/// checkpoint tensor's name and shape; and 16 evenly spaced elements of every tensor, rounded to bf16.
/// <para>
/// Deliberate choices: it is computed from the files, not from the loaded tensors, so it is the same whatever dtype
/// or device the model is loaded in (fp32, bf16, fp16; CPU or CUDA) and however the files are sharded; stored dtypes
/// are left out and sampled values compared at bf16 precision, so one checkpoint saved as fp32 and as bf16 (by
/// round-to-nearest) also agree. Two checkpoints with the same shapes but different weights (a base and its
/// instruction-tuned sibling, a merged model) differ in practically every sample and so get different fingerprints.
/// Reading the samples touches a few bytes per tensor (milliseconds even for a 7B model).
/// </para>
/// </summary>
public static class BaseFingerprint
{
    public const string MetadataKey = "lorakit.base_fingerprint";
    public const string ModelTypeKey = "lorakit.base_model_type";
    const int SamplesPerTensor = 16;

    /// <summary>The fingerprint of the checkpoint in <paramref name="dir"/>, read from its files without loading the model.</summary>
    public static string Of(string dir)
    {
        var config = ModelConfig.Load(dir);
        using var files = CheckpointFiles.Open(dir);
        return Compute(config, files);
    }

    public static string Compute(ModelConfig config, CheckpointFiles files)
    {
        var sb = new StringBuilder("lorakit-base-fingerprint/1\n");
        sb.Append($"{config.ModelType} {config.Architecture} hidden={config.HiddenSize} intermediate={config.IntermediateSize} " +
                  $"layers={config.NumHiddenLayers} heads={config.NumAttentionHeads} kv={config.NumKeyValueHeads} head_dim={config.HeadDim} " +
                  $"vocab={config.VocabSize} tied={config.TieWordEmbeddings}\n");
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        hash.AppendData(Encoding.UTF8.GetBytes(sb.ToString()));
        // A tied checkpoint may or may not carry lm_head.weight; rotary buffers are recomputed: neither is the model.
        var names = files.Names.Where(n => !(config.TieWordEmbeddings && n == "lm_head.weight") && !n.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal))
            .Order(StringComparer.Ordinal);
        foreach (var name in names)
        {
            var e = files.Entry(name);
            hash.AppendData(Encoding.UTF8.GetBytes($"{name} [{string.Join(",", e.Shape)}]\n"));
            if (DTypes.ToScalarType(e.DType) is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float64)) continue;
            using var scope = NewDisposeScope();
            var sample = files.ReadSample(name, SamplesPerTensor).to(ScalarType.Float32).to(ScalarType.BFloat16);
            hash.AppendData(sample.bytes);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    /// <summary>A short form for messages.</summary>
    public static string Short(string fingerprint) => fingerprint.Length > 12 ? fingerprint[..12] : fingerprint;
}
