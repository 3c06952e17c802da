using LoraKit.Models;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// <see cref="RmsNorm"/> on the training fast path, over the reference module's weight: while the weight is frozen,
/// <see cref="RmsNormFunction"/> (same numerics, keeps no fp32 copy of the input), and in no-grad passes (a checkpointed
/// layer's first forward) its fused forward kernel, so that pass computes what the replay recomputes in one kernel
/// instead of eight. Otherwise (a trained weight, evaluation) it computes the reference forward.
/// </summary>
public sealed class FusedRmsNorm : RmsNorm
{
    /// <summary>Shares <paramref name="reference"/>'s weight; starts in its training mode.</summary>
    public FusedRmsNorm(RmsNorm reference) : base(reference) => train(reference.training);

    public override Tensor forward(Tensor x)
    {
        if (training && !weight.requires_grad)
        {
            if (is_grad_enabled()) return RmsNormFunction.Apply(x, weight, Eps);
            if (FusedKernels.Usable(x, weight))
            {
                var (y, rstd) = FusedKernels.RmsNormForward(x, weight, Eps);
                rstd.Dispose();
                return y;
            }
        }
        return base.forward(x);
    }
}
