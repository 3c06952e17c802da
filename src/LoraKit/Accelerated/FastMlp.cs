using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// <see cref="Mlp"/> on the training fast path, over the reference module's projections: gate/up as one group whose
/// backwards sum the input grad in one buffer (<see cref="LoraProjection.ApplyShared"/>), the tail silu(gate)·up → down
/// as one function that keeps only gate and up for backward (<see cref="SwiGluDown"/>), and in no-grad passes (a
/// checkpointed layer's first forward) the fused SwiGLU product kernel, as the replay computes it. Outside training it
/// computes the reference forward.
/// </summary>
public sealed class FastMlp : Mlp
{
    /// <summary>Shares <paramref name="reference"/>'s projections; starts in its training mode.</summary>
    public FastMlp(Mlp reference) : base(reference)
    {
        if (gate_proj is null || up_proj is null)
            throw new ArgumentException("the fast MLP needs separate gate/up projections (see TrainingAccelerator.Declines)", nameof(reference));
        train(reference.training);
    }

    nn.Module<Tensor, Tensor> Gate => gate_proj!;
    nn.Module<Tensor, Tensor> Up => up_proj!;

    public override Tensor forward(Tensor x) => training ? Forward(x, null) : base.forward(x);

    /// <param name="stash">Checkpointing: keeps gate/up when recording, or uses them when replaying (<see cref="LayerStash"/>).</param>
    public Tensor Forward(Tensor x, LayerStash? stash)
    {
        using var scope = NewDisposeScope();
        bool replay = stash is { Replaying: true };
        var pair = training ? LoraProjection.ApplyShared(x, [Gate, Up], replay ? [stash!.Gate, stash.Up] : null) : null;
        var gate = pair?[0] ?? (replay && stash!.Gate is { } g ? LoraProjection.Replay(Gate, x, g) : Gate.forward(x));
        var up = pair?[1] ?? (replay && stash!.Up is { } u ? LoraProjection.Replay(Up, x, u) : Up.forward(x));
        if (stash is { Replaying: false, KeepMlp: true }) stash.KeepMlpOutputs(gate, up);
        if (training && is_grad_enabled() && LoraProjection.TryResolve(down_proj, out var down, out var lora))
            return SwiGluDown.Apply(gate, up, down, lora, outputUnused: replay).MoveToOuterDisposeScope();
        var h = training && FusedKernels.Usable(gate, up) && !(gate.requires_grad || up.requires_grad)
            ? FusedKernels.SwiGluForward(gate, up)
            : nn.functional.silu(gate) * up;
        return down_proj.forward(h).MoveToOuterDisposeScope();
    }
}
