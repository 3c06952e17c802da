using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// Rotary embedding as one autograd function for training on CUDA bf16: one fused kernel forward and one backward (the
/// transposed rotation of the gradient), with the roundings of the x·cos + rotate_half(x)·sin ops it replaces. On other
/// devices/dtypes it computes the same with TorchSharp ops (the reference its GPU check compares with).
/// </summary>
public sealed class RopeFunction : autograd.SingleTensorFunction<RopeFunction>
{
    public override string Name => "Rope";

    /// <param name="x">[B, T, H, D]</param>
    /// <param name="cos">[B, T, D]</param>
    /// <param name="sin">[B, T, D]</param>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        var y = apply(x, new Args(cos, sin));
        CustomFunctions.ReleaseOutputCache();
        return y;
    }

    sealed record Args(Tensor Cos, Tensor Sin);

    public static bool Fusable(Tensor x, Tensor cos, Tensor sin) =>
        x.shape[^1] % 16 == 0 && Runtime.Cuda.FusedKernels.Usable(x, cos, sin);

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var x = (Tensor)vars[0];
        var args = (Args)vars[1];
        CustomFunctions.Save(ctx, args.Cos, args.Sin); // the caller's cos/sin are freed before backward runs
        using var scope = NewDisposeScope();
        var y = Fusable(x, args.Cos, args.Sin) ? Runtime.Cuda.FusedKernels.Rope(x, args.Cos, args.Sin, backward: false)
            : RotaryEmbedding.Apply(x, args.Cos, args.Sin);
        return y.MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor dy)
    {
        Tensor dx;
        using (var scope = NewDisposeScope())
        {
            var saved = ctx.get_saved_variables();
            var (cos, sin) = (saved[0], saved[1]);
            var g = dy.contiguous();
            if (Fusable(g, cos, sin)) dx = Runtime.Cuda.FusedKernels.Rope(g, cos, sin, backward: true);
            else
            {
                // dx = dy·cos + rotate_halfᵀ(dy·sin), rotate_halfᵀ(z) = [z₂, −z₁]
                long half = g.shape[^1] / 2;
                var ds = g * sin.unsqueeze(2);
                dx = g * cos.unsqueeze(2);
                dx.narrow(-1, 0, half).add_(ds.narrow(-1, half, half));
                dx.narrow(-1, half, half).sub_(ds.narrow(-1, 0, half));
            }
            dx = dx.MoveToOuterDisposeScope();
            dy.Dispose();
        }
        return CustomFunctions.HandOff(dx, null);
    }
}
