using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Serving.Paged;

/// <summary>The step the engine is running: set before each forward, read by every <see cref="PagedAttention"/> layer.</summary>
public sealed class PagedContext(PagedKvCache cache)
{
    public PagedKvCache Cache { get; } = cache;
    public StepPlan? Plan { get; set; }
    /// <summary>Decode attention through a fused kernel (CUDA), or null: the libtorch gather path, the reference.</summary>
    public IPagedDecode? Kernel { get; set; }
}

/// <summary>A faster decode attention over the block tables (the NVRTC kernel on CUDA).</summary>
public interface IPagedDecode
{
    /// <summary>q [Bd, H, D] → output [Bd, H, D] over the layer's blocks; see <see cref="StepPlan.BlockTables"/>.</summary>
    void Decode(Tensor q, Tensor kCache, Tensor vCache, Tensor blockTables, Tensor seqLens, Tensor output, double scale, double softcap, int window);
}

/// <summary>
/// Attention of the serving engine, swapped in for <see cref="Attention"/> (its projections, norms and RoPE are the
/// reference's, shared, not copied): the step's tokens arrive packed in one row, their keys and values are written to
/// their cache slots, and each query attends to its own sequence's slots only — decode queries all at once, prefill
/// chunks each over its context with a causal mask offset by what is already cached. Sliding windows and soft-capped
/// or rescaled scores are honoured as the reference does. Forwards outside an engine step run the reference attention.
/// </summary>
public sealed class PagedAttention : Attention
{
    readonly PagedContext _ctx;
    readonly int? _window;

    public PagedAttention(Attention reference, PagedContext context, int? window) : base(reference)
    {
        _ctx = context;
        _window = window;
        Original = reference;
        train(reference.training);
    }

    /// <summary>The module this one replaced (put back when the engine stops).</summary>
    public Attention Original { get; }

    /// <summary>
    /// The original module, given the children that changed while this one served (an adapter loaded for a module not
    /// wrapped before replaced the projection here, not there).
    /// </summary>
    public Attention Restore()
    {
        foreach (var (name, now) in new (string, nn.Module<Tensor, Tensor>?)[] { (nameof(q_proj), q_proj), (nameof(k_proj), k_proj), (nameof(v_proj), v_proj),
                     (nameof(qkv_proj), qkv_proj), (nameof(o_proj), o_proj) })
            if (now is not null && !ReferenceEquals(typeof(Attention).GetField(name)!.GetValue(Original), now)) Original.ReplaceChild(name, now, keepPlace: true);
        return Original;
    }

    /// <summary>q [1, H, N, D], k and v [1, N, kvH, D] for the N packed tokens; returns [1, H, N, D].</summary>
    protected override Tensor Attend(Tensor q, Tensor k, Tensor v, Tensor? mask, KvCache? cache, int layer)
    {
        // Outside an engine step (classification, scoring run on the engine thread) the reference attention runs.
        if (_ctx.Plan is not { } plan) return base.Attend(q, k, v, mask, cache, layer);
        using var scope = NewDisposeScope();
        _ctx.Cache.Write(layer, plan.SlotMapping, k[0], v[0]);
        var qt = q[0].transpose(0, 1);                            // [N, H, D]
        var parts = new List<Tensor>();
        if (plan.DecodeRows > 0) parts.Add(Decode(qt.narrow(0, 0, plan.DecodeRows), plan, layer));
        foreach (var s in plan.Prefills) parts.Add(Prefill(qt.narrow(0, s.TokenStart, s.Length), s, layer));
        var output = parts.Count == 1 ? parts[0] : cat(parts, 0); // [N, H, D]
        return output.transpose(0, 1).unsqueeze(0).MoveToOuterDisposeScope();
    }

    Tensor Decode(Tensor q, StepPlan plan, int layer)
    {
        if (_ctx.Kernel is { } kernel && plan.BlockTables is { } tables && plan.SeqLens is { } lens)
        {
            var qc = q.contiguous();
            var output = empty_like(qc);
            kernel.Decode(qc, _ctx.Cache.Keys(layer), _ctx.Cache.Values(layer), tables, lens, output, Scale, Softcap ?? 0, _window ?? 0);
            return output;
        }
        var (k, v) = _ctx.Cache.Gather(layer, plan.DecodeSlots!);     // [Bd, S, kvH, D]
        var keyMask = plan.DecodeKeyMask!;                             // [Bd, 1, 1, S]
        if (_window is int w)
        {
            // Only the last w keys of each row: positions ≥ context − w.
            var pos = arange(keyMask.shape[^1], device: q.device).view(1, 1, 1, -1);
            var context = keyMask.sum([-1], keepdim: true, type: ScalarType.Int64);
            keyMask = keyMask.logical_and(pos.ge(context - w));
        }
        return Attention(q.unsqueeze(2), k, v, keyMask).squeeze(2);    // [Bd, H, D]
    }

    Tensor Prefill(Tensor q, PrefillSegment s, int layer)
    {
        var (k, v) = _ctx.Cache.Gather(layer, s.KeySlots.unsqueeze(0)); // [1, C, kvH, D]
        long past = s.Context - s.Length;
        var qpos = arange(past, s.Context, device: q.device).unsqueeze(1); // [T, 1]
        var kpos = arange(s.Context, device: q.device).unsqueeze(0);        // [1, C]
        var allowed = kpos.le(qpos);
        if (_window is int w) allowed = allowed.logical_and((qpos - kpos).lt(w));
        var output = Attention(q.transpose(0, 1).unsqueeze(0), k, v, allowed.view(1, 1, s.Length, s.Context)); // [1, H, T, D]
        return output[0].transpose(0, 1);                                   // [T, H, D]
    }

    /// <summary>q [B, H, T, D] over k, v [B, S, kvH, D] with a bool mask [B or 1, 1, T, S], as the reference attends.</summary>
    Tensor Attention(Tensor q, Tensor k, Tensor v, Tensor mask)
    {
        int rep = Heads / KvHeads;
        k = k.transpose(1, 2); v = v.transpose(1, 2);                  // [B, kvH, S, D]
        if (rep > 1) (k, v) = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1));
        if (Softcap is null && Scale == 1.0 / Math.Sqrt(HeadDim))
            return nn.functional.scaled_dot_product_attention(q, k, v, mask);
        return FamilyOps.EagerAttention(q, k, v, mask, Scale, Softcap);
    }
}
