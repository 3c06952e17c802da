using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Generation;

/// <summary>Why generation ended: the token limit or the context (Length), or an EOS id or stop string (Stop).</summary>
public enum FinishReason { Length, Stop }

/// <summary>
/// One generation: the prompt's ids, the new ids (an EOS that ended it included, as transformers does) and their text
/// (special tokens skipped, cut before a stop string).
/// </summary>
public sealed record GenerationResult(int[] PromptIds, int[] OutputIds, string Text, FinishReason FinishReason)
{
    /// <summary>When the serving engine produced it: seconds from arrival to the first and to the last token (null elsewhere).</summary>
    public RequestTiming? Timing { get; init; }
}

/// <summary>A served request's latency: time to first token, and the mean time per output token after the first.</summary>
public sealed record RequestTiming(double FirstTokenSeconds, double LastTokenSeconds, int OutputTokens)
{
    /// <summary>(last − first) / (tokens − 1), or 0 for a single token.</summary>
    public double TimePerOutputToken => OutputTokens > 1 ? (LastTokenSeconds - FirstTokenSeconds) / (OutputTokens - 1) : 0;
}

/// <summary>
/// Autoregressive decoding of one sequence with a KV cache; one dispose scope per step keeps native memory flat.
/// Prompt and output stay within the model's max_position_embeddings: a longer prompt is refused, and generation
/// stops at the limit with <see cref="FinishReason.Length"/>.
/// </summary>
public sealed class TextGenerator(CausalLM model, Tokenizer tokenizer)
{
    /// <summary>Generates from a prompt; <paramref name="onText"/> receives each new piece of decoded text.</summary>
    public GenerationResult Generate(int[] promptIds, SamplingOptions options, Action<string>? onText = null)
    {
        if (promptIds.Length == 0) throw new ArgumentException("the prompt encodes to no tokens; nothing to condition on");
        int context = model.Config.MaxPositionEmbeddings;
        SequenceState.CheckPromptFits(promptIds.Length, context);
        var seq = new SequenceState(promptIds, options, tokenizer, onText, context);
        var cache = new KvCache(model.Config.NumHiddenLayers);
        using var _ = no_grad();
        try
        {
            int[] step = promptIds;
            while (options.MaxNewTokens > 0)
            {
                using var scope = NewDisposeScope();
                if (LongRopeRecompute.Due(model.Config, cache.Length, cache.Length + step.Length))
                {
                    cache.Dispose();
                    cache = new KvCache(model.Config.NumHiddenLayers);
                    step = seq.Ids;
                }
                var ids = tensor(step.Select(x => (long)x).ToArray(), device: model.Device).unsqueeze(0);
                var logits = model.Logits(ids, null, cache);
                if (seq.Step(logits[0, -1])) break;
                step = [seq.LastToken];
            }
        }
        finally { cache.Dispose(); }
        return seq.Result();
    }
}
