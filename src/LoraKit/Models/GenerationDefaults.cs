using System.Text.Json;
using LoraKit.IO;

namespace LoraKit.Models;

/// <summary>What <c>generation_config.json</c> says about stopping: its eos_token_id(s), else config.json's.</summary>
public static class GenerationDefaults
{
    public static int[] EosTokenIds(string modelDir, ModelConfig config)
    {
        var path = Path.Combine(modelDir, "generation_config.json");
        if (File.Exists(path))
        {
            using var doc = JsonFiles.Parse(path);
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new LoraKitException($"{path}: must hold a JSON object, got {JsonFiles.KindOf(doc.RootElement)}");
            if (doc.RootElement.TryGetProperty("eos_token_id", out var e) && e.ValueKind != JsonValueKind.Null)
            {
                if (e.ValueKind is not (JsonValueKind.Number or JsonValueKind.Array))
                    throw new LoraKitException($"{path}: 'eos_token_id' must be a token id or a list of them, got {JsonFiles.KindOf(e)}");
                var items = e.ValueKind == JsonValueKind.Array ? e.EnumerateArray().ToArray() : [e];
                return items.Select(x => x.ValueKind == JsonValueKind.Number && x.TryGetInt32(out int id) && id >= 0 && id < config.VocabSize ? id
                    : throw new LoraKitException($"{path}: 'eos_token_id' {x.GetRawText()} is not a token id of this model (0..{config.VocabSize - 1})")).ToArray();
            }
        }
        return config.EosTokenIds;
    }
}
