using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// What a checkpointed layer keeps from its first (no-grad) forward besides its input, so that the replay in backward
/// runs only what backward needs. A frozen projection's backward needs its input and weights, never its output, so:
/// <list type="bullet">
/// <item>Keeping the residual stream after attention (<see cref="Mid"/>, one [tokens, hidden] tensor) lets the replay
/// skip o_proj's and down_proj's GEMMs, whose outputs only feed residual adds — about a third of a layer's GEMM FLOPs
/// for one activation of the size the checkpoint already keeps.</item>
/// <item>Optionally (within <see cref="DecoderModel.CheckpointKeepBytes"/>) keeping gate_proj's and up_proj's outputs
/// lets it skip those GEMMs too, about half of the FLOPs, at two [tokens, intermediate] tensors per layer.</item>
/// </list>
/// The replay then back-propagates the MLP half from Mid and the attention half from the input (see
/// <see cref="DecoderLayer.Replay"/>); what it still recomputes is the norms, q/k/v, RoPE and attention.
/// </summary>
public sealed class LayerStash(bool keepMlp) : IDisposable
{
    /// <summary>False while recording (the no-grad forward), true while replaying in backward.</summary>
    public bool Replaying { get; set; }
    /// <summary>Whether this layer keeps its gate/up outputs.</summary>
    public bool KeepMlp { get; } = keepMlp;
    public Tensor? Mid { get; private set; }
    public Tensor? Gate { get; private set; }
    public Tensor? Up { get; private set; }

    // Kept tensors leave the forward's dispose scope (which ends before backward runs); Dispose frees them.
    public void KeepMid(Tensor h) => Mid = h.detach().DetachFromDisposeScope();

    public void KeepMlpOutputs(Tensor gate, Tensor up)
    {
        Gate = gate.detach().DetachFromDisposeScope();
        Up = up.detach().DetachFromDisposeScope();
    }

    public void Dispose()
    {
        Mid?.Dispose(); Gate?.Dispose(); Up?.Dispose();
        Mid = Gate = Up = null;
    }
}
