using LoraKit.Models;
using LoraKit.Runtime;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// The tail of a SwiGLU MLP for LoRA training, down(silu(gate) · up) with the down projection's adapter folded in, as one
/// autograd function that keeps only gate and up. Autograd would also keep silu(gate) and the product (the down layer's
/// input, [tokens, intermediate] each — the largest activations of a layer); backward gets the product from the same
/// fused pass that computes the gate and up gradients (or from PyTorch's silu and product). The adapter branch runs in
/// the activations' dtype (see <see cref="LoraLinear.ComputeInInputDtype"/>); its weights' gradients are returned in
/// their own dtype (fp32).
/// Backward, with a = silu(g)·u and y = a·Wᵀ + s·(a·Aᵀ)·Bᵀ:
/// da = dy·W + s·(dy·B)·A, dA = s·(dy·B)ᵀ·a, dB = s·dyᵀ·(a·Aᵀ); dg = da·u·silu'(g), du = da·silu(g), with the
/// bf16 roundings of PyTorch's silu/mul backward (fused kernel on CUDA bf16, see <see cref="Runtime.Cuda.FusedKernels"/>).
/// </summary>
public sealed class SwiGluDown : autograd.SingleTensorFunction<SwiGluDown>
{
    public override string Name => "SwiGluDown";

    sealed record Args(Models.Linear Down, LoraWeights? Lora, bool OutputUnused);

    /// <summary>The tail for a down layer and adapter resolved by <see cref="LoraProjection.TryResolve"/>.</summary>
    /// <param name="outputUnused">A checkpoint replay that only needs the backward: skip the product and the down GEMM
    /// and return an uninitialised tensor (see <c>Accelerated.LayerStash</c>).</param>
    /// <remarks>On CUDA bf16 the backward writes its results over <paramref name="gate"/> and <paramref name="up"/>
    /// (<see cref="Runtime.Cuda.FusedKernels.SwiGluBackward"/>): nothing may read them after backward.</remarks>
    public static Tensor Apply(Tensor gate, Tensor up, Models.Linear down, LoraWeights? lora, bool outputUnused = false) =>
        CustomFunctions.AfterApply(apply(gate, up, lora?.A!, lora?.B!, new Args(down, lora, outputUnused)));

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var (g, u, args) = ((Tensor)vars[0], (Tensor)vars[1], (Args)vars[4]);
        using var scope = NewDisposeScope();
        var shape = g.shape.ToArray();
        shape[^1] = args.Down.OutFeatures;
        Tensor y;
        Tensor? h = null;
        if (args.OutputUnused) y = empty(shape, g.dtype, g.device); // backward computes h from the product its kernel writes
        else
        {
            var a = Product(g, u);
            var a2 = a.view(-1, a.shape[^1]);
            using (var down = new FrozenWeight(args.Down, a2.dtype)) y = nn.functional.linear(a2, down.W, args.Down.bias);
            if (args.Lora is { } w)
            {
                h = nn.functional.linear(a2, w.A.to(a.dtype));                         // [N, r]
                y.addmm_(h, w.B.to(a.dtype).t(), beta: 1, alpha: (float)w.Scaling);
            }
            y = y.view(shape);
        }
        CustomFunctions.Save(ctx, g, u, h);
        ctx.save_data("args", args);
        return y.MoveToOuterDisposeScope();
    }

    static Tensor Product(Tensor g, Tensor u) =>
        Runtime.Cuda.FusedKernels.Usable(g, u) ? Runtime.Cuda.FusedKernels.SwiGluForward(g, u) : nn.functional.silu(g).mul_(u);

    /// <summary>
    /// dg and du from da, and with <paramref name="product"/> the product a itself (the adapter's dA needs it; the
    /// forward did not keep it): one fused kernel on CUDA bf16, else silu's derivative written out.
    /// </summary>
    static (Tensor dg, Tensor du, Tensor? a) ProductGrads(Tensor da, Tensor g, Tensor u, bool product)
    {
        if (Runtime.Cuda.FusedKernels.Usable(da, g, u)) return Runtime.Cuda.FusedKernels.SwiGluBackward(da, g, u, product);
        var sig = g.sigmoid();
        var du = da * (g * sig);
        var dg = (da * u).mul_(sig).mul_(g.mul(ScalarOps.Subtract(1, sig)).Plus(1));
        return (dg, du, product ? Product(g, u) : null);
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor dy)
    {
        var args = (Args)ctx.get_data("args");
        Tensor dg, du;
        Tensor? dA = null, dB = null;
        using (var scope = NewDisposeScope())
        {
            var saved = ctx.get_saved_variables();
            var (g, u, h) = (saved[0], saved[1], saved[2]);
            var dy2 = dy.reshape(-1, dy.shape[^1]);
            // da = dy·W + dh·A, [N, intermediate]: the skinny adapter GEMM writes first and the base GEMM accumulates
            // onto it (beta = 1), rather than a separate memory-bound pass over da.
            Tensor? dh = null;
            Tensor da;
            using var down = new FrozenWeight(args.Down, dy.dtype);
            if (args.Lora is { } w)
            {
                dh = dy2.mm(w.B.to(dy.dtype)).TimesInPlace(w.Scaling);                         // s·dy·B, [N, r]
                da = dh.mm(w.A.to(dy.dtype)).addmm_(dy2, down.W);
            }
            else da = dy2.mm(down.W);
            down.Dispose(); // before the SwiGLU backward's buffers: one 16-bit W at a time
            (dg, du, var a) = ProductGrads(da.view(g.shape), g, u, product: args.Lora is not null);
            if (args.Lora is { } lw)
            {
                var a2 = a!.view(-1, g.shape[^1]);
                if (args.OutputUnused) h = a2.mm(lw.A.to(dy.dtype).t());              // a replay's forward kept no h
                dA = dh!.t().mm(a2).to(lw.A.dtype).MoveToOuterDisposeScope();
                dB = dy2.t().mm(h).TimesInPlace(lw.Scaling).to(lw.B.dtype).MoveToOuterDisposeScope();
            }
            dg = dg.MoveToOuterDisposeScope();
            du = du.MoveToOuterDisposeScope();
            dy.Dispose();
        }
        return CustomFunctions.HandOff(dg, du, dA, dB, null);
    }
}
