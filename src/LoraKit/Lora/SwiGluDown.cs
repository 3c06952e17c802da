using LoraKit.Models;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// The tail of a SwiGLU MLP for LoRA training, down(silu(gate) · up) with the down projection's adapter folded in, as one
/// autograd function that keeps only gate and up. Autograd would also keep silu(gate) and the product (the down layer's
/// input, [tokens, intermediate] each — the largest activations of a layer); backward recomputes them instead, which
/// costs one fused elementwise pass (or PyTorch's silu and product). The adapter branch runs in the activations' dtype (see
/// <see cref="LoraLinear.ComputeInInputDtype"/>); its weights' gradients are returned in their own dtype (fp32).
/// Backward, with a = silu(g)·u and y = a·Wᵀ + s·(a·Aᵀ)·Bᵀ:
/// da = dy·W + s·(dy·B)·A, dA = s·(dy·B)ᵀ·a, dB = s·dyᵀ·(a·Aᵀ); dg = da·u·silu'(g), du = da·silu(g), with the
/// bf16 roundings of PyTorch's silu/mul backward (fused kernel on CUDA bf16, see <see cref="Runtime.Cuda.FusedKernels"/>).
/// </summary>
public sealed class SwiGluDown : autograd.SingleTensorFunction<SwiGluDown>
{
    public override string Name => "SwiGluDown";

    sealed record Args(Models.Linear Down, LoraWeights? Lora);

    /// <summary>The frozen down layer and its single adapter (or none), when the fused path applies to this module.</summary>
    public static bool TryResolve(nn.Module<Tensor, Tensor> down, out Models.Linear baseLayer, out LoraWeights? lora)
    {
        lora = null;
        baseLayer = null!;
        switch (down)
        {
            case Models.Linear l: baseLayer = l; break;
            case LoraLinear ll when ll.TrySingleAdapter(out lora): baseLayer = ll.base_layer; break;
            default: return false;
        }
        return !baseLayer.weight.requires_grad && baseLayer.bias is not { requires_grad: true };
    }

    public static Tensor Apply(Tensor gate, Tensor up, Models.Linear down, LoraWeights? lora) =>
        CustomFunctions.AfterApply(apply(gate, up, lora?.A!, lora?.B!, new Args(down, lora)));

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var (g, u, args) = ((Tensor)vars[0], (Tensor)vars[1], (Args)vars[4]);
        using var scope = NewDisposeScope();
        var a = Product(g, u);
        var a2 = a.view(-1, a.shape[^1]);
        var y = nn.functional.linear(a2, args.Down.weight, args.Down.bias);
        Tensor? h = null;
        if (args.Lora is { } w)
        {
            h = nn.functional.linear(a2, w.A.to(a.dtype));                             // [N, r]
            y.addmm_(h, w.B.to(a.dtype).t(), beta: 1, alpha: (float)w.Scaling);
        }
        CustomFunctions.Save(ctx, g, u, h);
        ctx.save_data("args", args);
        var shape = g.shape.ToArray();
        shape[^1] = y.shape[^1];
        return y.view(shape).MoveToOuterDisposeScope();
    }

    static Tensor Product(Tensor g, Tensor u) =>
        Runtime.Cuda.FusedKernels.Usable(g, u) ? Runtime.Cuda.FusedKernels.SwiGluForward(g, u) : nn.functional.silu(g).mul_(u);

    /// <summary>dg and du from da: one fused kernel on CUDA bf16, else silu's derivative written out.</summary>
    static (Tensor dg, Tensor du) ProductGrads(Tensor da, Tensor g, Tensor u)
    {
        if (Runtime.Cuda.FusedKernels.Usable(da, g, u)) return Runtime.Cuda.FusedKernels.SwiGluBackward(da, g, u);
        var sig = g.sigmoid();
        var du = da * (g * sig);
        var dg = (da * u).mul_(sig).mul_(g * (1 - sig) + 1);
        return (dg, du);
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
            var da = dy2.mm(args.Down.weight);                                         // [N, intermediate]
            if (args.Lora is { } w)
            {
                var a2 = Product(g, u).view(-1, g.shape[^1]);                          // recomputed, for dA
                var dh = dy2.mm(w.B.to(dy.dtype)).mul_(w.Scaling);                     // s·dy·B, [N, r]
                da.addmm_(dh, w.A.to(dy.dtype));
                dA = dh.t().mm(a2).to(w.A.dtype).MoveToOuterDisposeScope();
                dB = dy2.t().mm(h).mul_(w.Scaling).to(w.B.dtype).MoveToOuterDisposeScope();
            }
            (dg, du) = ProductGrads(da.view(g.shape), g, u);
            dg = dg.MoveToOuterDisposeScope();
            du = du.MoveToOuterDisposeScope();
            dy.Dispose();
        }
        return CustomFunctions.HandOff(dg, du, dA, dB, null);
    }
}
