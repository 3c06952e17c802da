using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// Summed next-token cross-entropy through a frozen LM head without materialising the [N, vocab] logits for backward.
/// Forward walks the rows in chunks: logits of a chunk (in the head's dtype), the chunk's loss from their fp32
/// log-softmax (as transformers upcasts), and right away the gradient with respect to the chunk's hidden states,
/// (softmax − one-hot) · W, with the softmax rounded to the head's dtype like the gradient transformers casts back.
/// Only that gradient ([N, hidden]) is kept; backward scales it by the incoming gradient.
/// Requires a frozen head (LoRA training); full fine-tuning uses the plain path.
/// </summary>
public sealed class ChunkedLmLoss : autograd.SingleTensorFunction<ChunkedLmLoss>
{
    public override string Name => "ChunkedLmLoss";

    sealed record Saved(Tensor Tensor);

    /// <param name="hidden">[N, hidden] final hidden states (requires grad)</param>
    /// <param name="weight">[vocab, hidden] frozen LM head</param>
    /// <param name="targets">[N] int64 next-token ids, <see cref="Data.Sample.IgnoreIndex"/> where no loss is taken</param>
    /// <param name="chunkRows">rows per chunk; by default as many as keep a chunk's logits within <see cref="ChunkBytes"/></param>
    public static Tensor Compute(Tensor hidden, Tensor weight, Tensor targets, long? chunkRows = null) =>
        Runtime.CustomFunctions.AfterApply(apply(hidden, weight.detach(), targets, chunkRows ?? DefaultChunkRows(weight)));

    /// <summary>
    /// A chunk's logits are the loss's working memory on top of everything the forward keeps, so they bound the step's
    /// peak when checkpointing keeps the rest small: 256 MiB (1,024 rows of a 128k vocabulary) keeps the head's GEMMs
    /// large enough to run at full speed.
    /// </summary>
    public static long ChunkBytes { get; set; } = 256L << 20;

    static long DefaultChunkRows(Tensor weight) =>
        Math.Max(128, ChunkBytes / (weight.shape[0] * weight.ElementSize) / 128 * 128);

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        Runtime.CustomFunctions.Track(ctx);
        var hidden = (Tensor)vars[0];
        var weight = (Tensor)vars[1];
        var targets = (Tensor)vars[2];
        long chunk = (long)vars[3];
        long n = hidden.shape[0];
        using var _ = no_grad();
        var gradHidden = zeros_like(hidden).DetachFromDisposeScope();
        var total = zeros(1, ScalarType.Float32, hidden.device);
        for (long s = 0; s < n; s += chunk)
        {
            using var scope = NewDisposeScope();
            long len = Math.Min(chunk, n - s);
            var h = hidden.narrow(0, s, len);
            var t = targets.narrow(0, s, len);
            var logits = nn.functional.linear(h, weight);                               // [len, V], the head's dtype
            if (Runtime.Cuda.FusedKernels.Usable(logits))
            {
                // One fused pass per row: fp32 loss and the gradient written over the logits (ignored rows: zero).
                total.PlusInPlace(Runtime.Cuda.FusedKernels.CrossEntropyInPlace(logits, t.contiguous()).sum());
                gradHidden.narrow(0, s, len).copy_(logits.matmul(weight));
                continue;
            }
            var valid = t.NotEqual(Data.Sample.IgnoreIndex);
            var safeT = t.ClampMin(0).unsqueeze(1);
            // Loss in fp32 as transformers computes it (log-softmax of the fp32-upcast logits), read straight from the
            // head's output; one kernel instead of an fp32 copy plus logsumexp.
            var logProbs = logits.log_softmax(1, ScalarType.Float32);
            total.sub_((logProbs.gather(1, safeT).squeeze(1) * valid).sum());
            logProbs.Dispose();
            // d loss / d logits = softmax − one-hot, rounded to the head's dtype as transformers' cast back does.
            var g = logits.softmax(1);
            g.scatter_add_(1, safeT, ScalarOps.FullLike(safeT, -1.0, g.dtype));
            // Ignored rows: zero their [hidden] result rather than their [V] gradient row.
            gradHidden.narrow(0, s, len).copy_(g.matmul(weight).mul_(valid.unsqueeze(1)));
        }
        Runtime.Cuda.MemoryTrace.Mark("chunked loss", hidden.device);
        ctx.save_data("grad", new Saved(gradHidden)); // freed in backward; wrapped, as save_data warns on bare tensors
        return total.squeeze(0);
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
    {
        using var gradHidden = ((Saved)ctx.get_data("grad")).Tensor;
        using var scale = gradOutput.to(gradHidden.dtype);
        var grad = gradHidden * scale;
        gradOutput.Dispose();
        return Runtime.CustomFunctions.HandOff(grad, null, null, null);
    }
}
