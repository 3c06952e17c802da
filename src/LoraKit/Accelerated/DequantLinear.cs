using LoraKit.Quantization;
using LoraKit.Runtime;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// y = x·Wᵀ + b for a packed (quantized, frozen) weight, as one autograd function that keeps nothing for backward but
/// the packed weight itself: forward dequantizes W into a temporary, multiplies and drops it; backward dequantizes W
/// again for dx = dy·W. Autograd on the reference path (<see cref="PackedWeight.Linear"/>) would keep every layer's
/// dequantized W from forward to backward — a 16-bit copy of the whole model at the step's peak, which is what QLoRA
/// exists to avoid. The second dequantization costs one memory-bound pass over the packed bytes per layer
/// (see <see cref="KernelPackedWeights"/>). The weight and bias are frozen: no gradient flows to them.
/// </summary>
public sealed class DequantLinear : autograd.SingleTensorFunction<DequantLinear>
{
    public override string Name => "DequantLinear";

    sealed record Args(PackedWeight Weight, Tensor? Bias);

    /// <summary>x·Wᵀ + b with W dequantized in x's dtype for this call (and again for backward).</summary>
    public static Tensor Apply(Tensor x, PackedWeight weight, Tensor? bias)
    {
        if (!x.requires_grad || !is_grad_enabled())
        {
            using var w = weight.Dequantize(x.dtype);
            return nn.functional.linear(x, w, bias);
        }
        return CustomFunctions.AfterApply(apply(x, new Args(weight, bias)));
    }

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var x = (Tensor)vars[0];
        var args = (Args)vars[1];
        ctx.save_data("args", args);
        using var w = args.Weight.Dequantize(x.dtype);
        return nn.functional.linear(x, w, args.Bias);
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor dy)
    {
        var args = (Args)ctx.get_data("args");
        Tensor dx;
        using (var scope = NewDisposeScope())
        {
            using var w = args.Weight.Dequantize(dy.dtype);
            dx = dy.matmul(w).MoveToOuterDisposeScope();
            dy.Dispose();
        }
        return CustomFunctions.HandOff(dx, null);
    }
}
