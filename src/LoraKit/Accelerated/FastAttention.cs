using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// <see cref="Attention"/> with the training fast path swapped into its steps, over the reference module's own
/// projections and norms (the parameters and their names are the reference's):
/// <list type="bullet">
/// <item>Always: plain causal attention without mask or cache (training on unpadded rows, evaluation) runs ATen's
/// grouped-query kernel (<see cref="GqaAttention"/>), which maps query-head groups onto the kv heads itself, so the
/// repeated copies of k and v and their backward sums never exist.</item>
/// <item>With <see cref="Fused"/> while training: q/k/v as one group whose backwards sum the input grad in one buffer
/// (<see cref="LoraProjection.ApplyShared"/>), RoPE as one fused kernel each way on CUDA bf16 (<see cref="RopeFunction"/>),
/// and in a checkpoint's lean replay (<see cref="LayerStash"/>) the q/k/v outputs its first forward kept, and o_proj's
/// backward alone (its output is not read).</item>
/// </list>
/// </summary>
public sealed class FastAttention : Attention
{
    LayerStash? _stash; // set for the duration of one Forward call (see below)

    /// <summary>Whether the fused training kernels are on (the GQA kernel is used either way).</summary>
    public bool Fused { get; }

    /// <summary>Shares <paramref name="reference"/>'s submodules; starts in its training mode.</summary>
    public FastAttention(Attention reference, bool fused) : base(reference)
    {
        if (q_proj is null || k_proj is null || v_proj is null)
            throw new ArgumentException("the fast attention needs separate q/k/v projections (see TrainingAccelerator.Declines)", nameof(reference));
        Fused = fused;
        train(reference.training);
    }

    bool FusedNow => Fused && training;
    bool Replaying => _stash is { Replaying: true };

    public override Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer) =>
        Forward(x, cos, sin, mask, cache, layer, null);

    /// <param name="stash">While checkpointing with a lean replay: what the first forward keeps, or the replay reuses.</param>
    public Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer, LayerStash? stash)
    {
        // The stash reaches the overridden steps through a field: the reference forward's signature stays the reference's.
        _stash = stash;
        try { return base.Forward(x, cos, sin, mask, cache, layer); }
        finally { _stash = null; }
    }

    protected override Tensor[] ProjectQkv(Tensor x)
    {
        var qkv = FusedNow ? LoraProjection.ApplyShared(x, [q_proj!, k_proj!, v_proj!], Replaying ? _stash!.Qkv : null) : null;
        qkv ??= base.ProjectQkv(x);
        if (_stash is { Replaying: false, KeepQkv: true }) _stash.KeepQkvOutputs(qkv);
        return qkv;
    }

    protected override (Tensor q, Tensor k) Rotate(Tensor q, Tensor k, Tensor cos, Tensor sin)
    {
        // No-grad passes (a checkpointed layer's first forward) run the forward kernel alone.
        bool fused = FusedNow && RopeFunction.Fusable(q, cos, sin) && RopeFunction.Fusable(k, cos, sin);
        if (fused && (q.requires_grad || k.requires_grad)) return RopeFunction.Apply(q, k, cos, sin);
        if (fused) return (RopeFunction.Rotate(q, cos, sin), RopeFunction.Rotate(k, cos, sin));
        return base.Rotate(q, k, cos, sin);
    }

    protected override Tensor Attend(Tensor q, Tensor k, Tensor v, Tensor? mask, KvCache? cache, int layer)
    {
        bool grouped = Heads > KvHeads && cache == null && mask is null && GqaAttention.Available;
        return grouped ? GqaAttention.Causal(q, k.transpose(1, 2), v.transpose(1, 2)) : base.Attend(q, k, v, mask, cache, layer);
    }

    protected override Tensor ProjectOut(Tensor merged) =>
        Replaying ? LoraProjection.Replay(o_proj, merged, null) : base.ProjectOut(merged);
}
