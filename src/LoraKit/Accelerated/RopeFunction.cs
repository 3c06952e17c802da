using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// Rotary embedding of q and k as one autograd function for training on CUDA bf16: one fused kernel per tensor forward
/// and backward (the transposed rotation of the gradient), with the roundings of the x·cos + rotate_half(x)·sin ops it
/// replaces. q and k go through one call because each custom-function call costs host time that small models feel.
/// On other devices/dtypes it computes the same with TorchSharp ops (the reference its GPU check compares with).
/// </summary>
public sealed class RopeFunction : autograd.MultiTensorFunction<RopeFunction>
{
    public override string Name => "Rope";

    sealed record Args(Tensor Cos, Tensor Sin);

    /// <param name="q">[B, T, H, D]</param>
    /// <param name="k">[B, T, kvH, D]</param>
    /// <param name="cos">[B, T, D]</param>
    /// <param name="sin">[B, T, D]</param>
    public static (Tensor q, Tensor k) Apply(Tensor q, Tensor k, Tensor cos, Tensor sin)
    {
        var r = CustomFunctions.AfterApply(apply(q, k, new Args(cos, sin)));
        return (r[0], r[1]);
    }

    public static bool Fusable(Tensor x, Tensor cos, Tensor sin) =>
        x.shape[^1] % 16 == 0 && FusedKernels.Usable(x, cos, sin);

    /// <summary>The forward rotation without autograd: the fused kernel where <see cref="Fusable"/>, else TorchSharp ops.</summary>
    public static Tensor Rotate(Tensor x, Tensor cos, Tensor sin) =>
        Fusable(x, cos, sin) ? FusedKernels.Rope(x, cos, sin, backward: false) : RotaryEmbedding.Apply(x, cos, sin);

    static Tensor RotateBack(Tensor dy, Tensor cos, Tensor sin)
    {
        var g = dy.contiguous();
        if (Fusable(g, cos, sin)) return FusedKernels.Rope(g, cos, sin, backward: true);
        // dx = dy·cos + rotate_halfᵀ(dy·sin), rotate_halfᵀ(z) = [z₂, −z₁]
        long half = g.shape[^1] / 2;
        var ds = g * sin.unsqueeze(2);
        var dx = g * cos.unsqueeze(2);
        dx.narrow(-1, 0, half).PlusInPlace(ds.narrow(-1, half, half));
        dx.narrow(-1, half, half).sub_(ds.narrow(-1, 0, half));
        return dx;
    }

    public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var (q, k, args) = ((Tensor)vars[0], (Tensor)vars[1], (Args)vars[2]);
        CustomFunctions.Save(ctx, args.Cos, args.Sin); // the caller's cos/sin are freed before backward runs
        using var scope = NewDisposeScope();
        return [Rotate(q, args.Cos, args.Sin).MoveToOuterDisposeScope(), Rotate(k, args.Cos, args.Sin).MoveToOuterDisposeScope()];
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        Tensor? dq = null, dk = null;
        using (var scope = NewDisposeScope())
        {
            var saved = ctx.get_saved_variables();
            var (cos, sin) = (saved[0], saved[1]);
            if (grads[0] is { IsInvalid: false } gq) dq = RotateBack(gq, cos, sin).MoveToOuterDisposeScope();
            if (grads[1] is { IsInvalid: false } gk) dk = RotateBack(gk, cos, sin).MoveToOuterDisposeScope();
            foreach (var g in grads) g?.Dispose();
        }
        return CustomFunctions.HandOff(dq, dk, null);
    }
}
