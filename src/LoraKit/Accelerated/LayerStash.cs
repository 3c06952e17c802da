using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// What a checkpointed layer keeps from its first (no-grad) forward, so that the replay in backward runs only what
/// backward needs. A frozen projection's backward needs its input and weights, never its output, so:
/// <list type="bullet">
/// <item>Keeping the residual stream after attention (<see cref="Mid"/>, one [tokens, hidden] tensor) lets the replay
/// skip o_proj's and down_proj's GEMMs, whose outputs only feed residual adds — about a third of a layer's GEMM FLOPs
/// for one activation of the size the checkpoint already keeps (<see cref="Input"/>).</item>
/// <item>Optionally (within <see cref="CheckpointRunner.KeepBytes"/>) keeping gate_proj's and up_proj's outputs
/// lets it skip those GEMMs too, about half of the FLOPs, at two [tokens, intermediate] tensors per layer.</item>
/// <item>Beyond that budget, keeping q_proj's, k_proj's and v_proj's outputs (before RoPE) skips their GEMMs, a ninth of
/// the FLOPs for [tokens, hidden + 2 · kv width].</item>
/// </list>
/// The replay then back-propagates the MLP half from Mid and the attention half from the input (see
/// <see cref="LeanLayer.Replay"/>); what it still recomputes is the norms, q/k/v, RoPE and attention.
/// Input and Mid (and on some layers Gate and Up) may spend the time between forward and backward in host memory
/// (<see cref="CheckpointOffload"/>).
/// </summary>
public sealed class LayerStash(bool keepMlp, bool keepQkv = false) : IDisposable
{
    /// <summary>False while recording (the no-grad forward), true while replaying in backward.</summary>
    public bool Replaying { get; set; }
    /// <summary>Whether this layer keeps its gate/up outputs.</summary>
    public bool KeepMlp { get; } = keepMlp;
    /// <summary>Whether this layer keeps its q/k/v projections' outputs.</summary>
    public bool KeepQkv { get; } = keepQkv;
    public Tensor? Input { get; private set; }
    public Tensor? Mid { get; private set; }
    public Tensor? Gate { get; private set; }
    public Tensor? Up { get; private set; }
    /// <summary>q_proj's, k_proj's and v_proj's outputs, when <see cref="KeepQkv"/>.</summary>
    public Tensor[]? Qkv { get; private set; }

    /// <summary>The offload bookkeeping this stash takes part in, if any (its backward fetches Input and Mid back).</summary>
    internal CheckpointOffload.Pass? Offload { get; set; }
    readonly (long[] Shape, ScalarType Dtype, Device Device)[] _shapes = new (long[], ScalarType, Device)[4];

    // Kept tensors leave the forward's dispose scope (which ends before backward runs); Dispose frees them.
    public void KeepInput(Tensor x) => Input = x.detach().DetachFromDisposeScope();

    public void KeepMid(Tensor h) => Mid = h.detach().DetachFromDisposeScope();

    public void KeepMlpOutputs(Tensor gate, Tensor up)
    {
        Gate = gate.detach().DetachFromDisposeScope();
        Up = up.detach().DetachFromDisposeScope();
    }

    public void KeepQkvOutputs(Tensor[] qkv) => Qkv = qkv.Select(t => t.detach().DetachFromDisposeScope()).ToArray();

    /// <summary>The tensors <see cref="CheckpointOffload"/> may move, by slot: Input, Mid, then Gate and Up.</summary>
    internal Tensor? Stored(int slot) => slot switch { 0 => Input, 1 => Mid, 2 => Gate, _ => Up };

    internal (long[] Shape, ScalarType Dtype, Device Device) StoredShape(int slot) => _shapes[slot];

    /// <summary>Frees the first <paramref name="count"/> stored tensors on the device (their host copies are complete), remembering their shapes.</summary>
    internal void DropStored(int count)
    {
        for (int s = 0; s < count; s++)
        {
            var t = Stored(s)!;
            _shapes[s] = (t.shape, t.dtype, t.device);
            t.Dispose();
        }
        Input = Mid = null;
        if (count > 2) Gate = Up = null;
    }

    /// <summary>The stored tensors again, as tensors that are (or are being) copied back.</summary>
    internal void RestoreStored(Tensor[] tensors)
    {
        (Input, Mid) = (tensors[0], tensors[1]);
        if (tensors.Length > 2) (Gate, Up) = (tensors[2], tensors[3]);
    }

    public void Dispose()
    {
        Input?.Dispose(); Mid?.Dispose(); Gate?.Dispose(); Up?.Dispose();
        foreach (var t in Qkv ?? []) t.Dispose();
        Input = Mid = Gate = Up = null;
        Qkv = null;
    }
}
