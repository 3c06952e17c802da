using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.IO;

/// <summary>
/// Writes a model as a Hugging Face checkpoint directory transformers can load: config.json, safetensors (sharded
/// with an index above <c>maxShardBytes</c>) and the tokenizer/generation files copied from the source model.
/// The directory is assembled under a temporary name and renamed into place, so a crash leaves no half checkpoint.
/// </summary>
public static class CheckpointWriter
{
    static readonly string[] SideFiles =
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"];

    /// <param name="editConfig">changes config.json before it is written (e.g. a classifier's architecture and labels)</param>
    /// <param name="head">tensors that replace lm_head.weight (e.g. a classifier's score.weight), or null to keep it</param>
    public static void Save(CausalLM model, string sourceDir, string outDir, long maxShardBytes = 5L << 30,
        Action<JsonObject>? editConfig = null, IReadOnlyDictionary<string, Tensor>? head = null)
    {
        OutputDirectory.EnsureNewOrEmpty(outDir);
        var full = Path.GetFullPath(outDir);
        var tmp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.tmp-{Environment.ProcessId}");
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        try { Write(model, sourceDir, tmp, maxShardBytes, editConfig, head); }
        catch
        {
            try { Directory.Delete(tmp, true); } catch (IOException) { } // never leave a half checkpoint behind
            throw;
        }
        if (Directory.Exists(full)) Directory.Delete(full);
        Directory.Move(tmp, full);
    }

    static void Write(CausalLM model, string sourceDir, string tmp, long maxShardBytes,
        Action<JsonObject>? editConfig, IReadOnlyDictionary<string, Tensor>? head)
    {
        var config = (JsonObject)model.Config.Raw.DeepClone();
        config["dtype"] = model.DType switch
        {
            ScalarType.BFloat16 => "bfloat16",
            ScalarType.Float16 => "float16",
            _ => "float32",
        };
        config.Remove("torch_dtype");
        editConfig?.Invoke(config);
        File.WriteAllText(Path.Combine(tmp, "config.json"), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        foreach (var f in SideFiles)
            if (File.Exists(Path.Combine(sourceDir, f))) File.Copy(Path.Combine(sourceDir, f), Path.Combine(tmp, f));

        var tensors = new List<(string name, Tensor t)>();
        foreach (var (name, p) in model.named_parameters())
        {
            string key = name.Replace(".base_layer.", ".", StringComparison.Ordinal); // LoRA wrappers are not part of the checkpoint
            if (key.Contains(".lora_", StringComparison.Ordinal)) continue; // nor are adapters (registered parameters: …lora_A.<adapter>.weight)
            if (key == "lm_head.weight" && (model.Config.TieWordEmbeddings || head != null)) continue;
            tensors.Add((key, p));
        }
        if (head != null) tensors.AddRange(head.Select(kv => (kv.Key, kv.Value)));
        WriteShards(tmp, tensors, maxShardBytes);
    }

    static void WriteShards(string dir, List<(string name, Tensor t)> tensors, long maxShardBytes)
    {
        var meta = new Dictionary<string, string> { ["format"] = "pt" };
        var shards = new List<List<(string name, Tensor t)>> { new() };
        long size = 0, total = 0;
        foreach (var item in tensors.OrderBy(x => x.name, StringComparer.Ordinal))
        {
            long bytes = item.t.numel() * item.t.element_size();
            if (size > 0 && size + bytes > maxShardBytes) { shards.Add([]); size = 0; }
            shards[^1].Add(item);
            size += bytes;
            total += bytes;
        }
        if (shards.Count == 1)
        {
            SafetensorsWriter.Save(Path.Combine(dir, "model.safetensors"), shards[0].ToDictionary(x => x.name, x => x.t), meta);
            return;
        }
        var weightMap = new JsonObject();
        for (int i = 0; i < shards.Count; i++)
        {
            string file = $"model-{i + 1:00000}-of-{shards.Count:00000}.safetensors";
            SafetensorsWriter.Save(Path.Combine(dir, file), shards[i].ToDictionary(x => x.name, x => x.t), meta);
            foreach (var (name, _) in shards[i]) weightMap[name] = file;
        }
        var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = total }, ["weight_map"] = weightMap };
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
