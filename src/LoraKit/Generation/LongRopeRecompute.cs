using LoraKit.Models;

namespace LoraKit.Generation;

/// <summary>
/// transformers' Phi3ForCausalLM (prepare_inputs_for_generation) drops the KV cache when a sequence first grows past
/// LongRoPE's original_max_position_embeddings: the cached keys were rotated with the short factors, and from that step
/// on the model uses the long ones, so the whole sequence is recomputed once (every key then rotated with the long
/// factors). Generation does the same to give transformers' tokens; other architectures keep their cache.
/// </summary>
public static class LongRopeRecompute
{
    /// <summary>
    /// Whether the next forward must start from an empty cache and the whole sequence: <paramref name="cached"/>
    /// positions are cached (at most original_max_position_embeddings) and the sequence reaches
    /// <paramref name="total"/> positions, more than original_max_position_embeddings.
    /// </summary>
    public static bool Due(ModelConfig c, long cached, long total) =>
        cached > 0 && c.Architecture == "Phi3ForCausalLM" && c.RopeFor(0).Scaling is LongRopeScaling lr
        && total > lr.OriginalMaxPositionEmbeddings && cached <= lr.OriginalMaxPositionEmbeddings;
}
