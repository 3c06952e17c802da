using System.Text.Json;

namespace LoraKit.Models;

/// <summary>What <c>generation_config.json</c> says about stopping: its eos_token_id(s), else config.json's.</summary>
public static class GenerationDefaults
{
    public static int[] EosTokenIds(string modelDir, ModelConfig config)
    {
        var path = Path.Combine(modelDir, "generation_config.json");
        if (File.Exists(path))
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            if (doc.RootElement.TryGetProperty("eos_token_id", out var e))
            {
                if (e.ValueKind == JsonValueKind.Number) return [e.GetInt32()];
                if (e.ValueKind == JsonValueKind.Array) return e.EnumerateArray().Select(x => x.GetInt32()).ToArray();
            }
        }
        return config.EosTokenIds;
    }
}
