using static TorchSharp.torch;

namespace LoraKit.Generation;

/// <summary>Chooses the next token from last-position logits.</summary>
internal sealed class Sampler
{
    readonly SamplingOptions _o;
    readonly Generator? _rng;

    public Sampler(SamplingOptions options)
    {
        options.Validate();
        _o = options;
        if (!options.IsGreedy) _rng = new Generator((ulong)(options.Seed ?? Random.Shared.NextInt64()));
    }

    /// <summary>Next token for logits of shape [vocab].</summary>
    public int Next(Tensor logits)
    {
        using var scope = NewDisposeScope();
        if (_o.IsGreedy) return (int)logits.argmax().item<long>();
        var l = logits.to(ScalarType.Float32, CPU).DividedBy(_o.Temperature);
        if (_o.TopK > 0 && _o.TopK < l.shape[0])
        {
            var kth = l.topk(_o.TopK).values[-1];
            l = l.MaskedFill(l < kth, double.NegativeInfinity);
        }
        if (_o.TopP < 1.0)
        {
            // transformers' TopPLogitsWarper: drop the low tail whose total probability is ≤ 1 - top_p, keep ≥ 1 token.
            var (sorted, idx) = l.sort(descending: false);
            var cum = sorted.softmax(-1).cumsum(-1);
            var remove = cum.AtMost(1 - _o.TopP);
            remove[-1] = false;
            var removeOriginal = zeros_like(remove).scatter(0, idx, remove);
            l = l.MaskedFill(removeOriginal, double.NegativeInfinity);
        }
        var probs = l.softmax(-1);
        return (int)multinomial(probs, 1, false, _rng).item<long>();
    }
}
