using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Generation;

/// <summary>
/// A text scored by a model (<c>lorakit score</c>'s work): its token ids, the fp32 logits at the last position and the
/// mean next-token loss (null for a one-token text). Texts past the model's context are refused, not scored: positions
/// the model never saw give a silently meaningless loss, and attention grows with the square of the length.
/// </summary>
/// <param name="InputIds">the text's token ids (with the tokenizer's special tokens, e.g. BOS)</param>
/// <param name="LastLogits">fp32 logits at the last position (the next token's distribution)</param>
/// <param name="Loss">mean next-token cross-entropy over the text; null when it has one token</param>
public sealed record TextScore(int[] InputIds, float[] LastLogits, double? Loss)
{
    /// <summary>Scores <paramref name="text"/> with <paramref name="model"/> (no gradients, one dispose scope).</summary>
    public static TextScore Of(CausalLM model, Tokenizer tokenizer, string text)
    {
        // No token spans 1,024 characters: a text that long is refused before it is encoded.
        int limit = model.Config.MaxPositionEmbeddings;
        if ((long)text.Length > 1024L * limit)
            throw new ArgumentException($"the text has {text.Length} characters, far past the model's context of {limit} tokens");
        var ids = tokenizer.Encode(text);
        if (ids.Length == 0) throw new ArgumentException("the text encodes to no tokens");
        if (ids.Length > limit)
            throw new ArgumentException($"the text has {ids.Length} tokens, but the model's context (max_position_embeddings) is {limit} tokens; shorten it");
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var input = tensor(ids.Select(x => (long)x).ToArray(), device: model.Device).unsqueeze(0);
        var logits = model.Logits(input, null, null).to(ScalarType.Float32);
        var last = logits[0, -1].cpu().data<float>().ToArray();
        double? loss = ids.Length > 1 ? CausalLM.NextTokenLoss(logits[0], input[0]).item<float>() : null;
        return new TextScore(ids, last, loss);
    }
}
