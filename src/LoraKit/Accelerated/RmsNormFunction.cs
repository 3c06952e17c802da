using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// RMSNorm with a hand-written backward for a frozen weight: the same forward arithmetic as <see cref="RmsNorm"/>
/// (normalise in fp32, round to the input dtype, scale), but it keeps only the input (its own dtype) and the fp32
/// reciprocal RMS per row, where autograd would keep an fp32 copy of the input. Backward, with n = x·r:
/// dx = r · (dn − n · mean(dn · n)), dn = (dy · w) in fp32 — exactly the chain transformers' ops give.
/// </summary>
public sealed class RmsNormFunction : autograd.SingleTensorFunction<RmsNormFunction>
{
    public override string Name => "RmsNorm";

    sealed record Args(Tensor Weight, double Eps);

    public static Tensor Apply(Tensor x, Tensor weight, double eps) => CustomFunctions.AfterApply(apply(x, new Args(weight, eps)));

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var x = (Tensor)vars[0];
        var args = (Args)vars[1];
        using var scope = NewDisposeScope();
        Tensor y, rstd;
        if (FusedKernels.Usable(x, args.Weight)) (y, rstd) = FusedKernels.RmsNormForward(x, args.Weight, args.Eps);
        else
        {
            var h = Fp32Copy(x);
            rstd = h.Pow(2).mean([-1], keepdim: true).PlusInPlace(args.Eps).rsqrt_();
            y = args.Weight * h.mul_(rstd).to(x.dtype);
        }
        CustomFunctions.Save(ctx, x, rstd);
        ctx.save_data("args", args);
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>An fp32 tensor this function may modify in place (to() returns the input itself when it is fp32 already).</summary>
    static Tensor Fp32Copy(Tensor x) => x.dtype == ScalarType.Float32 ? x.clone() : x.to(ScalarType.Float32);

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor dy)
    {
        var args = (Args)ctx.get_data("args");
        Tensor dx;
        using (var scope = NewDisposeScope())
        {
            var saved = ctx.get_saved_variables();
            var (x, rstd) = (saved[0], saved[1]);
            if (FusedKernels.Usable(dy, x, args.Weight))
                dx = FusedKernels.RmsNormBackward(dy, x, args.Weight, rstd).MoveToOuterDisposeScope();
            else
            {
                var n = Fp32Copy(x).mul_(rstd);
                var dn = (dy * args.Weight).to(ScalarType.Float32);
                var dot = (dn * n).mean([-1], keepdim: true);
                dx = dn.sub_(n.mul_(dot)).mul_(rstd).to(x.dtype).MoveToOuterDisposeScope();
            }
            dy.Dispose();
        }
        return CustomFunctions.HandOff(dx, null);
    }
}
