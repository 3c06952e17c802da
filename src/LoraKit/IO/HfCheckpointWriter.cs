using System.Text.Json;
using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LoraKit.IO;

/// <summary>
/// Writes a Hugging Face checkpoint directory from its parts: config.json, the tensors as safetensors (sharded with an
/// index above <c>maxShardBytes</c>) and the tokenizer/generation side files copied from a source directory. Knows
/// files only: which tensors and which config a model has is the caller's (Models/CheckpointWriter).
/// The directory is assembled under a temporary name and renamed into place, so a crash leaves no half checkpoint.
/// </summary>
internal static class HfCheckpointWriter
{
    static readonly string[] SideFiles =
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"];

    /// <summary>
    /// Writes <paramref name="config"/> and <paramref name="tensors"/> (checkpoint key → tensor) into the new or empty
    /// directory <paramref name="outDir"/>, with the side files found in <paramref name="sideFilesFrom"/> (if any).
    /// </summary>
    public static void Write(string outDir, JsonObject config, IReadOnlyList<(string key, Tensor tensor)> tensors,
        string? sideFilesFrom, long maxShardBytes = 5L << 30)
    {
        OutputDirectory.EnsureNewOrEmpty(outDir);
        var full = Path.GetFullPath(outDir);
        var tmp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.tmp-{Environment.ProcessId}");
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        try
        {
            File.WriteAllText(Path.Combine(tmp, "config.json"), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            if (sideFilesFrom != null)
                foreach (var f in SideFiles)
                    if (File.Exists(Path.Combine(sideFilesFrom, f))) File.Copy(Path.Combine(sideFilesFrom, f), Path.Combine(tmp, f));
            WriteShards(tmp, tensors, maxShardBytes);
        }
        catch
        {
            try { Directory.Delete(tmp, true); } catch (IOException) { } // never leave a half checkpoint behind
            throw;
        }
        if (Directory.Exists(full)) Directory.Delete(full);
        Directory.Move(tmp, full);
    }

    static void WriteShards(string dir, IReadOnlyList<(string name, Tensor t)> tensors, long maxShardBytes)
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
