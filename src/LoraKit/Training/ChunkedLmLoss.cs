using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// Summed next-token cross-entropy through a frozen LM head without materialising the [N, vocab] logits for backward.
/// Forward walks the rows in chunks: logits of a chunk (in the head's dtype, upcast to fp32 like transformers),
/// the chunk's loss, and right away the gradient with respect to the chunk's hidden states,
/// (softmax − one-hot) · W. Only that gradient ([N, hidden]) is kept; backward scales it by the incoming gradient.
/// Requires a frozen head (LoRA training); full fine-tuning uses the plain path.
/// </summary>
public sealed class ChunkedLmLoss : autograd.SingleTensorFunction<ChunkedLmLoss>
{
    public override string Name => "ChunkedLmLoss";

    sealed record Saved(Tensor Tensor);

    /// <param name="hidden">[N, hidden] final hidden states (requires grad)</param>
    /// <param name="weight">[vocab, hidden] frozen LM head</param>
    /// <param name="targets">[N] int64 next-token ids, <see cref="Data.Sample.IgnoreIndex"/> where no loss is taken</param>
    public static Tensor Compute(Tensor hidden, Tensor weight, Tensor targets, long chunkRows = 2048)
    {
        var loss = apply(hidden, weight.detach(), targets, chunkRows);
        Models.CustomFunctions.ReleaseOutputCache();
        return loss;
    }

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        Models.CustomFunctions.Track(ctx);
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
            var valid = t.ne(Data.Sample.IgnoreIndex);
            var safeT = t.clamp_min(0).unsqueeze(1);
            var logits = nn.functional.linear(h, weight).to(ScalarType.Float32);      // [len, V]
            var lse = logits.logsumexp(1, keepdim: true);                               // [len, 1]
            var picked = logits.gather(1, safeT);                                       // [len, 1]
            total.add_(((lse - picked).squeeze(1) * valid).sum());
            // d loss / d logits = softmax − one-hot, zero on ignored rows; reuse the logits buffer.
            var g = logits.sub_(lse).exp_();
            g.scatter_add_(1, safeT, full_like(picked, -1.0f));
            g.mul_(valid.unsqueeze(1));
            gradHidden.narrow(0, s, len).copy_(g.to(hidden.dtype).matmul(weight));
        }
        ctx.save_data("grad", new Saved(gradHidden)); // freed in backward; wrapped, as save_data warns on bare tensors
        return total.squeeze(0);
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
    {
        using var gradHidden = ((Saved)ctx.get_data("grad")).Tensor;
        using var scale = gradOutput.to(gradHidden.dtype);
        var grad = gradHidden * scale;
        gradOutput.Dispose();
        return Models.CustomFunctions.HandOff(grad, null, null, null);
    }
}
