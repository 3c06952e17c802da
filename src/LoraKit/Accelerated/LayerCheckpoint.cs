using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Runtime.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// Activation checkpointing for one decoder layer (TorchSharp has none built in): forward runs without building a graph
/// and keeps only the layer's input; backward re-runs the layer with gradients on and back-propagates through it, which
/// fills the trainable weights' grads and returns the input's grad. The CPU RNG state is replayed so dropout draws the same
/// masks in the recomputation (CUDA's generator state is not reachable from TorchSharp, see the README).
/// On the fused training path the replay is lean (<see cref="LayerStash"/>): the forward also keeps the mid-layer
/// residual (and, within the model's budget, gate/up), and the replay skips the GEMMs whose outputs backward never reads.
/// </summary>
public sealed class LayerCheckpoint : autograd.SingleTensorFunction<LayerCheckpoint>
{
    /// <summary>Everything the layer needs besides its input, passed through apply() as one object.</summary>
    /// The tensors are aliases taken out of the caller's dispose scope (which ends before backward runs); backward frees them.
    /// The input is kept by the stash when there is one (it may spend the time until backward in host memory).
    sealed record Call(DecoderLayer Layer, Tensor? Input, Tensor Cos, Tensor Sin, Tensor? Mask, int Index, byte[] RngState, LayerStash? Stash, RngStream? Rng = null, byte[]? StreamState = null)
    {
        public void Free() { Input?.Dispose(); Cos.Dispose(); Sin.Dispose(); Mask?.Dispose(); Stash?.Dispose(); }
    }

    public override string Name => "LayerCheckpoint";

    /// <param name="stash">For a lean replay (when <see cref="LeanLayer.Applies"/>): what the forward keeps;
    /// null replays the whole layer. Freed after backward.</param>
    public static Tensor Run(DecoderLayer layer, Tensor x, Tensor cos, Tensor sin, Tensor? mask, int index, LayerStash? stash = null, RngStream? rngStream = null)
    {
        // TorchSharp wraps forward's result in a second handle, so the first one (put in this scope by the layer) is
        // freed here: the caller's scope would otherwise hold every layer's output until the whole forward ends.
        using var scope = NewDisposeScope();
        using var rng = random.get_rng_state();
        var stream = rngStream;
        stash?.KeepInput(x);
        var call = new Call(layer, stash is null ? Keep(x.detach()) : null, Keep(cos.alias()), Keep(sin.alias()), mask is null ? null : Keep(mask.alias()), index, rng.bytes.ToArray(), stash, stream, stream?.State());
        return CustomFunctions.AfterApply(apply(x, call)).MoveToOuterDisposeScope();
    }

    static Tensor Keep(Tensor t) => t.DetachFromDisposeScope();

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        CustomFunctions.Track(ctx);
        var call = (Call)vars[1];
        ctx.save_data("call", call);
        using var _ = no_grad();
        var x = (Tensor)vars[0];
        return call.Stash is { } stash
            ? LeanLayer.Forward(call.Layer, x, call.Cos, call.Sin, call.Mask, call.Index, stash)
            : call.Layer.Forward(x, call.Cos, call.Sin, call.Mask, null, call.Index);
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
    {
        var call = (Call)ctx.get_data("call");
        using var outerRng = random.get_rng_state();
        using (var saved = empty(call.RngState.Length, ScalarType.Byte))
        {
            saved.bytes = call.RngState;
            random.set_rng_state(saved);
        }
        var outerStream = call.Rng?.State();
        if (call.StreamState is { } st) call.Rng!.Restore(st);
        Tensor grad;
        using (var scope = NewDisposeScope())
        using (var __ = enable_grad())
        {
            call.Stash?.Offload?.BeforeBackward(call.Index);
            grad = (call.Stash is { } stash
                ? LeanLayer.Replay(call.Layer, stash.Input!, call.Cos, call.Sin, call.Mask, call.Index, stash, gradOutput)
                : FullReplay(call, gradOutput)).MoveToOuterDisposeScope();
        }
        random.set_rng_state(outerRng);
        if (outerStream is not null) call.Rng!.Restore(outerStream);
        call.Free();
        gradOutput.Dispose();
        MemoryTrace.Mark("backward layer {0}", call.Index, grad.device);
        return CustomFunctions.HandOff(grad, null); // one entry per apply() argument; the Call object has no gradient
    }

    /// <summary>Re-runs the whole layer with gradients on and back-propagates through it; returns the input's grad.</summary>
    static Tensor FullReplay(Call call, Tensor gradOutput)
    {
        var input = call.Input!.detach().requires_grad_(true);
        var y = call.Layer.Forward(input, call.Cos, call.Sin, call.Mask, null, call.Index);
        autograd.backward([y], [gradOutput]);
        return input.grad!.detach();
    }
}
