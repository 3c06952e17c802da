using LoraKit.Models;
using LoraKit.Tokenization;

namespace LoraKit.Generation;

/// <summary>
/// The one place that decides which token ids end generation for a model: generation_config.json's eos_token_id(s)
/// (else config.json's, see <see cref="GenerationDefaults"/>), plus the tokenizer's own EOS token (tokenizer_config's
/// eos_token), which chat models often end a turn with even where the generation config forgets it. Each id once, in
/// that order. Every surface (CLI generate, the server, the library entry point) should take its ids from here.
/// </summary>
public static class StopTokens
{
    /// <summary>The stop ids of the model in <paramref name="modelDir"/> (null: a model built in memory, config.json's ids only).</summary>
    public static int[] For(ModelConfig config, Tokenizer tokenizer, string? modelDir)
    {
        var fromConfig = modelDir is null ? config.EosTokenIds : GenerationDefaults.EosTokenIds(modelDir, config);
        return fromConfig.Concat(tokenizer.EosTokenId is int id ? [id] : Array.Empty<int>()).Distinct().ToArray();
    }
}
