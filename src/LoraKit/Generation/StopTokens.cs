using System.Text.Json;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Tokenization;

namespace LoraKit.Generation;

/// <summary>
/// The one rule for which token ids end a generation, used by every surface that generates (<c>lorakit generate</c>,
/// the demo, the HTTP server and its chat client): <c>generation_config.json</c>'s <c>eos_token_id</c>
/// (one id or a list; when the file or the field is absent, config.json's), plus the tokenizer's EOS token when it
/// names another id. vLLM stops on the same union: chat models whose tokenizer ends a turn with a token (e.g.
/// <c>&lt;|im_end|&gt;</c>) that generation_config does not list would otherwise never stop. Without a tokenizer it
/// is transformers' rule (generation_config alone): the trainer checks trained data against that one, since an
/// exported adapter often runs under transformers.
/// </summary>
public static class StopTokens
{
    /// <summary>Name of the file whose <c>eos_token_id</c> overrides config.json's.</summary>
    public const string GenerationConfigFile = "generation_config.json";

    /// <summary>
    /// The EOS ids for generation: <paramref name="modelDir"/>'s generation_config.json ids (or <paramref name="config"/>'s
    /// when the directory is null or has none), then <paramref name="tokenizer"/>'s EOS token id when given and not
    /// already listed. A malformed generation_config.json is a <see cref="LoraKitException"/> naming the file and field.
    /// </summary>
    public static int[] EosTokenIds(ModelConfig config, Tokenizer? tokenizer, string? modelDir)
    {
        var ids = (modelDir is null ? null : FromGenerationConfig(modelDir, config)) ?? config.EosTokenIds;
        return tokenizer?.EosTokenId is int id ? [.. ids.Append(id).Distinct()] : [.. ids.Distinct()];
    }

    /// <summary>generation_config.json's eos ids, or null when the file is absent or its field is absent or null.</summary>
    public static int[]? FromGenerationConfig(string modelDir, ModelConfig config)
    {
        var path = Path.Combine(modelDir, GenerationConfigFile);
        if (!File.Exists(path)) return null;
        using var doc = JsonFiles.Parse(path);
        if (doc.RootElement.ValueKind != JsonValueKind.Object)
            throw new LoraKitException($"{path}: must hold a JSON object, got {JsonFiles.KindOf(doc.RootElement)}");
        if (!doc.RootElement.TryGetProperty("eos_token_id", out var e) || e.ValueKind == JsonValueKind.Null) return null;
        if (e.ValueKind is not (JsonValueKind.Number or JsonValueKind.Array))
            throw new LoraKitException($"{path}: 'eos_token_id' must be a token id or a list of them, got {JsonFiles.KindOf(e)}");
        var items = e.ValueKind == JsonValueKind.Array ? e.EnumerateArray().ToArray() : [e];
        return items.Select(x => x.ValueKind == JsonValueKind.Number && x.TryGetInt32(out int id) && id >= 0 && id < config.VocabSize ? id
            : throw new LoraKitException($"{path}: 'eos_token_id' {x.GetRawText()} is not a token id of this model (0..{config.VocabSize - 1})")).ToArray();
    }
}
