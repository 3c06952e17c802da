using LoraKit.Lora;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Export;

/// <summary>The tensor type of an exported model's matrices (norms and other 1-D tensors are always F32).</summary>
public enum GgufFileType
{
    /// <summary>IEEE half (llama.cpp's MOSTLY_F16).</summary>
    F16,
    /// <summary>bfloat16 (MOSTLY_BF16).</summary>
    BF16,
    /// <summary>8-bit blocks of 32 with an fp16 scale (MOSTLY_Q8_0); a matrix whose rows are not whole blocks stays F16, as convert_hf_to_gguf.py does.</summary>
    Q8_0,
    /// <summary>float32 (ALL_F32).</summary>
    F32,
}

/// <summary>
/// <c>lorakit export gguf</c>: a LoraKit model (with an adapter merged in) or a LoRA adapter alone written as the GGUF
/// files llama.cpp (and so Ollama and LLamaSharp) loads, laid out as llama.cpp's convert_hf_to_gguf.py and
/// convert_lora_to_gguf.py write them. Everything is checked before the output is created: an unsupported architecture
/// or tokenizer fails in one line, and an existing output file is never overwritten.
/// </summary>
public static class GgufExport
{
    /// <summary>Parses "f16", "bf16", "q8_0" or "f32".</summary>
    public static GgufFileType ParseType(string type) => type.ToLowerInvariant() switch
    {
        "f16" => GgufFileType.F16,
        "bf16" => GgufFileType.BF16,
        "q8_0" => GgufFileType.Q8_0,
        "f32" => GgufFileType.F32,
        _ => throw new GgufExportException($"unknown GGUF type '{type}' (f16, bf16, q8_0 or f32)"),
    };

    /// <summary>
    /// Writes the model in <paramref name="modelDir"/>, with the adapter in <paramref name="adapterDir"/> merged into it
    /// when given, to the new file <paramref name="output"/>.
    /// </summary>
    public static void Model(string modelDir, string? adapterDir, string output, GgufFileType type = GgufFileType.F16, Action<int, int, string>? progress = null)
    {
        CheckOutput(output);
        var arch = GgufArchitecture.For(ModelConfig.Load(modelDir));
        var w = Start(arch, modelDir, "model");
        w.Add("general.file_type", FileTypeNumber(type));
        w.Add("general.quantization_version", 2u);
        arch.WriteHyperParameters(w);
        GgufVocab.Write(w, modelDir, arch.Config.VocabSize, arch.Config.Raw);

        using var lm = new LoraModel(CausalLM.Load(modelDir, ScalarType.Float32, CPU));
        if (adapterDir is not null)
        {
            AdapterFiles.Load(lm, "default", adapterDir);
            lm.Merge("default");
        }
        using var _ = no_grad();
        foreach (var (name, values) in arch.ExtraTensors())
            w.AddTensor(name, [values.Length], GgmlType.F32, () => GgufEncoding.Encode(values, GgmlType.F32, values.Length));
        foreach (var (name, p) in lm.Model.named_parameters())
        {
            if (MergedCheckpoint.CheckpointKey(name) is not string key) continue;
            if (key == "lm_head.weight" && arch.Config.TieWordEmbeddings) continue; // llama.cpp reuses token_embd
            AdapterFiles.CheckFinite(p, key, $"merged model (not written to {output})", double.PositiveInfinity);
            AddTensor(w, GgufArchitecture.TensorName(key), p.shape, type, () => arch.Reorder(key, p.detach()));
        }
        w.Save(output, progress);
    }

    /// <summary>
    /// Writes the LoRA adapter in <paramref name="adapterDir"/> (made for the model in <paramref name="modelDir"/>) to
    /// the new file <paramref name="output"/> as llama.cpp's LoRA GGUF: <c>blk.N.attn_q.weight.lora_a</c> [r, in] and
    /// <c>.lora_b</c> [out, r] (q/k rows of B permuted as the base's), <c>adapter.lora.alpha</c>. llama.cpp scales every
    /// module by alpha / r; where PEFT's scaling differs (rsLoRA, rank or alpha patterns) the difference is folded into B.
    /// </summary>
    public static void Adapter(string modelDir, string adapterDir, string output, GgufFileType type = GgufFileType.F16, Action<int, int, string>? progress = null)
    {
        CheckOutput(output);
        var arch = GgufArchitecture.For(ModelConfig.Load(modelDir));
        using var lm = new LoraModel(CausalLM.Load(modelDir, ScalarType.Float32, CPU));
        using var prepared = AdapterFiles.Read(lm, adapterDir);
        var config = prepared.Config;
        if (config.UseDora) throw new GgufExportException($"{adapterDir}: DoRA adapters have no llama.cpp LoRA form; export the merged model instead (without --adapter-only)");
        var w = Start(arch, modelDir, "adapter");
        w.Add("general.file_type", FileTypeNumber(type));
        w.Add("adapter.type", "lora");
        w.Add("adapter.lora.alpha", (float)config.LoraAlpha);
        using var _ = no_grad();
        foreach (var (key, weights) in prepared.Weights.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            var (a, b) = (weights.A, weights.B);
            double fold = config.Scaling(key) * a.shape[0] / config.LoraAlpha; // 1 unless PEFT's scaling is not alpha / r
            string name = GgufArchitecture.TensorName(key + ".weight");
            AddTensor(w, name + ".lora_a", a.shape, type, () => a.detach());
            AddTensor(w, name + ".lora_b", b.shape, type, () => arch.Reorder(key, b.detach().to(ScalarType.Float32).mul(fold)));
        }
        w.Save(output, progress);
    }

    /// <summary>Refuses an output path that exists (LoraKit never overwrites a file it did not create) or has no parent folder.</summary>
    static void CheckOutput(string output)
    {
        var full = Path.GetFullPath(output);
        if (File.Exists(full) || Directory.Exists(full) || new FileInfo(full).LinkTarget is not null)
            throw new GgufExportException($"output '{output}' already exists; LoraKit does not overwrite it (remove it or choose another path)");
        if (File.Exists(full + ".tmp"))
            throw new GgufExportException($"'{output}.tmp' exists (another export running, or one that was killed); remove it first");
        var parent = Path.GetDirectoryName(full);
        if (parent is not null && !Directory.Exists(parent))
            throw new GgufExportException($"cannot write '{output}': folder '{parent}' does not exist");
    }

    static GgufWriter Start(GgufArchitecture arch, string modelDir, string kind)
    {
        var w = new GgufWriter();
        w.Add("general.architecture", arch.Name);
        w.Add("general.type", kind);
        w.Add("general.name", Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(modelDir))));
        return w;
    }

    /// <summary>llama.cpp's <c>llama_ftype</c> number for general.file_type.</summary>
    static uint FileTypeNumber(GgufFileType type) => type switch
    {
        GgufFileType.F32 => 0,
        GgufFileType.F16 => 1,
        GgufFileType.Q8_0 => 7,
        GgufFileType.BF16 => 32,
        _ => throw new ArgumentOutOfRangeException(nameof(type)),
    };

    /// <summary>
    /// Adds one tensor: F32 for 1-D tensors and norms (as convert_hf_to_gguf.py keeps them), else the chosen type, with
    /// Q8_0 falling back to F16 for rows that are not whole blocks.
    /// </summary>
    /// <remarks><paramref name="tensor"/> is called when the writer reaches the tensor, inside a dispose scope of its own.</remarks>
    static void AddTensor(GgufWriter w, string name, long[] shape, GgufFileType fileType, Func<Tensor> tensor)
    {
        long[] ne = shape.Reverse().ToArray();
        var type = shape.Length <= 1 || name.EndsWith("_norm.weight", StringComparison.Ordinal) ? GgmlType.F32 : fileType switch
        {
            GgufFileType.F32 => GgmlType.F32,
            GgufFileType.F16 => GgmlType.F16,
            GgufFileType.BF16 => GgmlType.BF16,
            GgufFileType.Q8_0 => GgufEncoding.FitsQ8_0(ne[0]) ? GgmlType.Q8_0 : GgmlType.F16,
            _ => throw new ArgumentOutOfRangeException(nameof(fileType)),
        };
        w.AddTensor(name, ne, type, () =>
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            var values = tensor().contiguous().to(ScalarType.Float32).data<float>().ToArray();
            return GgufEncoding.Encode(values, type, ne[0]);
        });
    }
}
