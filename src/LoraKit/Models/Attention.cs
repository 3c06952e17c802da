using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>
/// Grouped-query self-attention with RoPE, optional q/k/v biases (Qwen2), optional per-head q/k RMSNorm (Qwen3, Gemma 3)
/// and an optional KV cache. q, k and v come from three projections, or from one fused qkv_proj (Phi-3,
/// <see cref="ModelConfig.FusedQkv"/>) whose output is split as transformers splits it. Attention itself is PyTorch's
/// scaled_dot_product_attention over k/v heads repeated for their query-head groups, as transformers' eager path
/// computes it; a model whose scores are soft-capped or scaled by other than head_dim^-½ (Gemma) takes transformers'
/// eager attention itself (<see cref="FamilyOps.EagerAttention"/>).
/// <para>
/// The forward is four steps (project, rotate, attend, project out), each a protected virtual method, so that a faster
/// implementation can replace one step from outside while this class stays the reference.
/// </para>
/// </summary>
public class Attention : ContainerModule
{
    /// <summary>The separate projections; null when <see cref="qkv_proj"/> holds all three.</summary>
    public nn.Module<Tensor, Tensor>? q_proj, k_proj, v_proj;
    /// <summary>Phi-3: one projection whose output rows are q, then k, then v (null for the other families).</summary>
    public nn.Module<Tensor, Tensor>? qkv_proj;
    public nn.Module<Tensor, Tensor> o_proj;
    public RmsNorm? q_norm, k_norm;

    /// <summary>Query heads, key/value heads, and the width of one head.</summary>
    public int Heads { get; }
    public int KvHeads { get; }
    public int HeadDim { get; }
    /// <summary>The scores' scale (<see cref="ModelConfig.AttentionScale"/>).</summary>
    public double Scale { get; }
    /// <summary>The scores' soft-cap (<see cref="ModelConfig.AttnLogitSoftcap"/>), or null.</summary>
    public double? Softcap { get; }

    public Attention(string name, WeightSource w, ModelConfig c) : base("Attention")
    {
        Heads = c.NumAttentionHeads; KvHeads = c.NumKeyValueHeads; HeadDim = c.HeadDim;
        (Scale, Softcap) = (c.AttentionScale, c.AttnLogitSoftcap);
        if (c.FusedQkv) qkv_proj = new Linear(name + ".qkv_proj", w, c.HiddenSize, (Heads + 2 * KvHeads) * HeadDim, c.QkvBias);
        else
        {
            q_proj = new Linear(name + ".q_proj", w, c.HiddenSize, Heads * HeadDim, c.QkvBias);
            k_proj = new Linear(name + ".k_proj", w, c.HiddenSize, KvHeads * HeadDim, c.QkvBias);
            v_proj = new Linear(name + ".v_proj", w, c.HiddenSize, KvHeads * HeadDim, c.QkvBias);
        }
        o_proj = new Linear(name + ".o_proj", w, Heads * HeadDim, c.HiddenSize, c.OProjBias);
        if (c.QkNorm)
        {
            q_norm = new RmsNorm(name + ".q_norm", w, HeadDim, c.RmsNormEps, c.Norm);
            k_norm = new RmsNorm(name + ".k_norm", w, HeadDim, c.RmsNormEps, c.Norm);
        }
        RegisterComponents();
    }

    /// <summary>A module over <paramref name="other"/>'s submodules (shared, not copied), for a subclass swapped in after build.</summary>
    public Attention(Attention other) : base("Attention")
    {
        (Heads, KvHeads, HeadDim, Scale, Softcap) = (other.Heads, other.KvHeads, other.HeadDim, other.Scale, other.Softcap);
        (q_proj, k_proj, v_proj, qkv_proj, o_proj) = (other.q_proj, other.k_proj, other.v_proj, other.qkv_proj, other.o_proj);
        (q_norm, k_norm) = (other.q_norm, other.k_norm);
        RegisterChildrenOf(other);
    }

    public override Tensor forward(Tensor x) => throw new NotSupportedException("call Forward with positions and mask");

    /// <param name="x">[B, T, hidden]</param>
    /// <param name="cos">[B, T, head_dim]</param>
    /// <param name="sin">[B, T, head_dim]</param>
    /// <param name="mask">bool [B or 1, 1, T, S] (true = may attend), or null for plain causal attention without cache.</param>
    /// <param name="cache">Past keys and values (generation), or null.</param>
    /// <param name="layer">This layer's index (its slot in the cache).</param>
    public virtual Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1];
        // RoPE and the kv-head repeat work on the projections' own [B, T, heads, D] layout (contiguous, so the
        // elementwise kernels vectorise); SDPA takes the [B, heads, T, D] views.
        var qkv = ProjectQkv(x);
        var q = qkv[0].view(b, t, Heads, HeadDim);
        var k = qkv[1].view(b, t, KvHeads, HeadDim);
        var v = qkv[2].view(b, t, KvHeads, HeadDim);
        if (q_norm != null) q = q_norm.forward(q);
        if (k_norm != null) k = k_norm.forward(k);
        (q, k) = Rotate(q, k, cos, sin);
        var attn = Attend(q.transpose(1, 2), k, v, mask, cache, layer);
        var merged = attn.transpose(1, 2).reshape(b, t, Heads * HeadDim);
        return ProjectOut(merged).MoveToOuterDisposeScope();
    }

    /// <summary>q, k and v projections of <paramref name="x"/>, each [B, T, heads·D] (views of qkv_proj's output when fused).</summary>
    protected virtual Tensor[] ProjectQkv(Tensor x)
    {
        if (qkv_proj is null) return [q_proj!.forward(x), k_proj!.forward(x), v_proj!.forward(x)];
        var (q, k, v) = FamilyOps.SplitQkv(qkv_proj.forward(x), Heads, KvHeads, HeadDim);
        return [q, k, v];
    }

    /// <summary>RoPE on q [B, T, H, D] and k [B, T, kvH, D].</summary>
    protected virtual (Tensor q, Tensor k) Rotate(Tensor q, Tensor k, Tensor cos, Tensor sin) =>
        (RotaryEmbedding.Apply(q, cos, sin), RotaryEmbedding.Apply(k, cos, sin));

    /// <summary>
    /// Attention of q [B, H, T, D] over k, v [B, T, kvH, D] (appended to <paramref name="cache"/> first, when given);
    /// returns [B, H, T, D].
    /// </summary>
    protected virtual Tensor Attend(Tensor q, Tensor k, Tensor v, Tensor? mask, KvCache? cache, int layer)
    {
        int rep = Heads / KvHeads;
        if (cache != null)
        {
            (k, v) = cache.Append(layer, k.transpose(1, 2), v.transpose(1, 2));
            if (rep > 1) (k, v) = (RepeatKv(k, rep), RepeatKv(v, rep));
        }
        else if (rep > 1) (k, v) = (RepeatKvTokensFirst(k, rep).transpose(1, 2), RepeatKvTokensFirst(v, rep).transpose(1, 2));
        else (k, v) = (k.transpose(1, 2), v.transpose(1, 2));
        if (Softcap is null && Scale == 1.0 / Math.Sqrt(HeadDim))
            return nn.functional.scaled_dot_product_attention(q, k, v, mask, 0.0, mask is null);
        // A null mask means plain causal attention over as many keys as queries (no cache, no window, no padding).
        mask ??= ones(q.shape[2], k.shape[2], dtype: ScalarType.Bool, device: q.device).tril();
        return FamilyOps.EagerAttention(q, k, v, mask, Scale, Softcap);
    }

    /// <summary>o_proj over the heads' merged outputs [B, T, H·D].</summary>
    protected virtual Tensor ProjectOut(Tensor merged) => o_proj.forward(merged);

    /// <summary>[B, S, kvH, D] → [B, S, kvH·rep, D], each kv head repeated for its group of query heads.</summary>
    static Tensor RepeatKvTokensFirst(Tensor x, int rep)
    {
        long b = x.shape[0], s = x.shape[1], h = x.shape[2], d = x.shape[3];
        return x.unsqueeze(3).expand(b, s, h, rep, d).reshape(b, s, h * rep, d);
    }

    /// <summary>[B, kvH, S, D] → [B, kvH·rep, S, D], each kv head repeated for its group of query heads.</summary>
    static Tensor RepeatKv(Tensor x, int rep)
    {
        long b = x.shape[0], h = x.shape[1], s = x.shape[2], d = x.shape[3];
        return x.unsqueeze(2).expand(b, h, rep, s, d).reshape(b, h * rep, s, d);
    }
}
