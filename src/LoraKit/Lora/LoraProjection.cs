using LoraKit.Models;
using LoraKit.Runtime;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// A frozen projection with at most one adapter, y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, as one autograd function with a
/// hand-written backward (training fast path; the branch runs in the activations' dtype, see
/// <see cref="LoraLinear.ComputeInInputDtype"/>). Backward, with h = x·Aᵀ:
/// dh = dy·(sB), dx = dh·A + dy·W (the base GEMM accumulates onto the adapter's: autograd would add two [tokens, in] tensors),
/// dA = dhᵀ·x, dB = s·dyᵀ·h — the ops and roundings of the autograd path otherwise. dA and dB are added straight into
/// the parameters' grads when those exist (as they do under <see cref="Training.AdamW"/>), which is what autograd's
/// accumulation would do, in one kernel each.
/// A checkpoint replay (<c>Accelerated.LayerStash</c>) may pass the output's value when it was kept from the first forward,
/// or say that nothing reads it (o_proj, down_proj): the function then skips the [tokens, in]×[in, out] GEMM and
/// returns the kept tensor or an uninitialised one, since its backward needs only x, h and the weights.
/// </summary>
public sealed class LoraProjection : autograd.SingleTensorFunction<LoraProjection>
{
    public override string Name => "LoraProjection";

    static long _skipped;
    /// <summary>Forward GEMMs skipped so far by replays (for tests: proves the lean replay ran).</summary>
    public static long SkippedOutputs => Interlocked.Read(ref _skipped);

    /// <summary>How a call produces its output: computed, taken from <see cref="Known"/>, or left uninitialised.</summary>
    public enum Output { Compute, Known, Unused }

    sealed record Args(Models.Linear Base, LoraWeights? Lora, Output Mode, Tensor? Known, bool NeedsInputGrad, long[] InputShape, SharedInputGrad? Shared,
        GroupedDown? Down);

    /// <summary>This projection's columns of a group's h = x·[A₁; A₂; …]ᵀ, and its rows of that bf16 A.</summary>
    sealed record GroupedDown(Tensor H, Tensor A16);

    /// <summary>The frozen base layer and its single live adapter (or none), when this function applies to the module.</summary>
    public static bool TryResolve(nn.Module<Tensor, Tensor> module, out Models.Linear baseLayer, out LoraWeights? lora)
    {
        lora = null;
        baseLayer = null!;
        switch (module)
        {
            case Models.Linear l: baseLayer = l; break;
            case LoraLinear ll when ll.TrySingleAdapter(out lora): baseLayer = ll.base_layer; break;
            default: return false;
        }
        // A quantized (packed) base is frozen by construction; its W is dequantized per GEMM (FrozenWeight).
        return (baseLayer.IsQuantized || !baseLayer.weight.requires_grad) && baseLayer.bias is not { requires_grad: true };
    }

    public static Tensor Apply(Tensor x, Models.Linear baseLayer, LoraWeights? lora, Output mode = Output.Compute, Tensor? known = null,
        SharedInputGrad? shared = null) => Apply(x, baseLayer, lora, mode, known, shared, null);

    static Tensor Apply(Tensor x, Models.Linear baseLayer, LoraWeights? lora, Output mode, Tensor? known, SharedInputGrad? shared, GroupedDown? down)
    {
        if (mode == Output.Known && known is null) throw new ArgumentNullException(nameof(known));
        return CustomFunctions.AfterApply(apply(x, lora?.A!, lora?.B!, new Args(baseLayer, lora, mode, known, x.requires_grad, x.shape, shared, down)));
    }

    /// <summary>
    /// Training: projections that read the same input (q/k/v, gate/up) as one group. Their adapters' first GEMM is one
    /// x·[A₁; A₂; …]ᵀ, so x is read once for all of them, and likewise in backward for their dA (see
    /// <see cref="SharedInputGrad"/>), which also sums their input grads in one buffer. Without gradients (a checkpointed
    /// layer's first forward) the outputs are computed the same way. Null when grouping does not apply (a module this
    /// function does not cover): then run them one by one. <paramref name="known"/> gives a replay's kept outputs
    /// (null entries are computed).
    /// </summary>
    public static Tensor[]? ApplyShared(Tensor x, nn.Module<Tensor, Tensor>[] modules, Tensor?[]? known = null)
    {
        var resolved = new (Models.Linear b, LoraWeights? l)[modules.Length];
        for (int i = 0; i < modules.Length; i++)
        {
            if (modules[i] is LoraLinear { ComputeInInputDtype: false } || !TryResolve(modules[i], out var b, out var l)) return null;
            resolved[i] = (b, l);
        }
        var downs = GroupDown(x, resolved.Select(r => r.l).ToArray());
        if (!is_grad_enabled())
        {
            if (downs is null) return null;
            using var scope = NewDisposeScope();
            var x2 = x.reshape(-1, x.shape[^1]);
            return resolved.Select((r, i) =>
            {
                var shape = x.shape.ToArray();
                shape[^1] = r.b.OutFeatures;
                return Compute(x2, downs[i]?.H, r.l is { } w ? w.B.Times(w.Scaling).to(x.dtype) : null, r.b).view(shape).MoveToOuterDisposeScope();
            }).ToArray();
        }
        var shared = x.requires_grad ? new SharedInputGrad(modules.Length) : null; // else only the adapters need grads
        return resolved.Select((r, i) => known?[i] is { } k
            ? Apply(x, r.b, r.l, Output.Known, k, shared, downs?[i])
            : Apply(x, r.b, r.l, Output.Compute, null, shared, downs?[i])).ToArray();
    }

    /// <summary>h = x·[A₁; A₂; …]ᵀ for a group with two or more adapters (null otherwise), split back per projection.</summary>
    static GroupedDown?[]? GroupDown(Tensor x, LoraWeights?[] loras)
    {
        if (loras.Count(l => l != null) < 2) return null;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad(); // the A parameters get their grads from the hand-written backward
        var a16 = cat(loras.Where(l => l != null).Select(l => (Tensor)l!.A).ToArray(), 0).to(x.dtype);   // [Σr, in]
        var h = nn.functional.linear(x.reshape(-1, x.shape[^1]), a16);                                   // [N, Σr]
        var result = new GroupedDown?[loras.Length];
        long offset = 0;
        for (int i = 0; i < loras.Length; i++)
        {
            if (loras[i] is not { } w) continue;
            result[i] = new GroupedDown(h.narrow(1, offset, w.Rank).MoveToOuterDisposeScope(), a16.narrow(0, offset, w.Rank).MoveToOuterDisposeScope());
            offset += w.Rank;
        }
        return result;
    }

    /// <summary>
    /// A checkpoint replay's call of <paramref name="module"/>: its output is <paramref name="known"/>, or unread when null.
    /// Modules this function does not cover (several adapters, dropout, a trainable base) run as usual.
    /// </summary>
    public static Tensor Replay(nn.Module<Tensor, Tensor> module, Tensor x, Tensor? known) =>
        TryResolve(module, out var baseLayer, out var lora)
            ? Apply(x, baseLayer, lora, known is null ? Output.Unused : Output.Known, known)
            : module.forward(x);

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var x = (Tensor)vars[0];
        var args = (Args)vars[3];
        using var scope = NewDisposeScope();
        var x2 = x.reshape(-1, x.shape[^1]);
        var outShape = x.shape.ToArray();
        outShape[^1] = args.Base.OutFeatures;
        Tensor? h = null, a16 = null, sb16 = null;
        if (args.Lora is { } w)
        {
            sb16 = w.B.Times(w.Scaling).to(x.dtype);
            (h, a16) = args.Down is { } g ? (g.H, g.A16) : (nn.functional.linear(x2, a16 = w.A.to(x.dtype)), a16);  // [N, r]
        }
        if (args.Mode != Output.Compute) Interlocked.Increment(ref _skipped);
        Tensor y = args.Mode switch
        {
            Output.Known => args.Known!.detach(),
            Output.Unused => empty(outShape, x.dtype, x.device),
            _ => Compute(x2, h, sb16, args.Base).view(outShape),
        };
        CustomFunctions.Save(ctx, x2, h, a16, sb16);
        ctx.save_data("args", args);
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The adapter GEMM writes s·h·Bᵀ + b, then the base GEMM adds x·Wᵀ onto it (one write of the output); x2 is
    /// [N, in], h = x2·Aᵀ (null: no adapter), sb16 = s·B in x2's dtype. Also <see cref="LoraLinear"/>'s no-grad path.
    /// </summary>
    internal static Tensor Compute(Tensor x2, Tensor? h, Tensor? sb16, Models.Linear baseLayer)
    {
        using var w = new FrozenWeight(baseLayer, x2.dtype);
        return h is null
            ? nn.functional.linear(x2, w.W, baseLayer.bias)
            : nn.functional.linear(h, sb16!, baseLayer.bias).addmm_(x2, w.W.t());
    }

    static bool HasGrad(Parameter p)
    {
        using var grad = p.grad;
        return grad is not null;
    }

    /// <summary>grad += scale · g when <paramref name="p"/> has a grad already; false (nothing done) otherwise.</summary>
    static bool AccumulateInto(Parameter p, Tensor g, double scale)
    {
        using var grad = p.grad;
        if (grad is null) return false;
        grad.PlusInPlace(g, scale);
        return true;
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor dy)
    {
        var args = (Args)ctx.get_data("args");
        Tensor? dx = null, dA = null, dB = null;
        using (var scope = NewDisposeScope())
        {
            var saved = ctx.get_saved_variables();
            var (x2, h, a16, sb16) = (saved[0], saved[1], saved[2], saved[3]);
            var dy2 = dy.reshape(-1, dy.shape[^1]);
            Tensor? dh = args.Lora is null ? null : dy2.mm(sb16);                              // [N, r]
            // A group's dA comes out of one GEMM over x in SharedInputGrad, where A has a grad to add it into.
            bool aDeferred = args.NeedsInputGrad && args.Shared != null && args.Down != null && args.Lora is { } lw && HasGrad(lw.A);
            using var weight = args.NeedsInputGrad ? new FrozenWeight(args.Base, dy.dtype) : default;
            if (args.NeedsInputGrad && args.Shared is { } shared)
            {
                if (shared.Add(dy2, weight.W, dh, a16, aDeferred ? (x2, args.Lora!.A) : null) is { } sum)
                {
                    dx = sum.view(args.InputShape).MoveToOuterDisposeScope();
                    sum.Dispose();
                }
            }
            else if (args.NeedsInputGrad)
            {
                // The skinny adapter GEMM writes first and the base GEMM accumulates onto it (beta = 1, read in its
                // epilogue), rather than a separate memory-bound pass over dx.
                dx = dh is null ? dy2.mm(weight.W) : dh.mm(a16).addmm_(dy2, weight.W);
                dx = dx.view(args.InputShape).MoveToOuterDisposeScope();
            }
            if (args.Lora is { } w)
            {
                var gB = dy2.t().mm(h);
                // Where the parameters already have grads (the optimizer's flat buffer), add into them in one kernel
                // each (fp32 += the bf16 product, scaled) instead of cast, scale and autograd's separate accumulation.
                if (!aDeferred)
                {
                    var gA = dh!.t().mm(x2);
                    if (AccumulateInto(w.A, gA, 1.0) is false) dA = gA.to(w.A.dtype).MoveToOuterDisposeScope();
                }
                if (AccumulateInto(w.B, gB, w.Scaling) is false) dB = gB.to(w.B.dtype).TimesInPlace(w.Scaling).MoveToOuterDisposeScope();
            }
            dy.Dispose();
        }
        return CustomFunctions.HandOff(dx, dA, dB, null);
    }
}
