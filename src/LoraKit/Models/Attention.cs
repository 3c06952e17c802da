using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>
/// Grouped-query self-attention with RoPE, optional q/k/v biases (Qwen2), optional per-head q/k RMSNorm (Qwen3)
/// and an optional KV cache. Attention itself is PyTorch's scaled_dot_product_attention.
/// </summary>
public sealed class Attention : ContainerModule
{
    public nn.Module<Tensor, Tensor> q_proj, k_proj, v_proj, o_proj;
    public RmsNorm? q_norm, k_norm;
    readonly int _heads, _kvHeads, _headDim;

    public Attention(string name, WeightSource w, ModelConfig c) : base("Attention")
    {
        _heads = c.NumAttentionHeads; _kvHeads = c.NumKeyValueHeads; _headDim = c.HeadDim;
        q_proj = new Linear(name + ".q_proj", w, c.HiddenSize, _heads * _headDim, c.QkvBias);
        k_proj = new Linear(name + ".k_proj", w, c.HiddenSize, _kvHeads * _headDim, c.QkvBias);
        v_proj = new Linear(name + ".v_proj", w, c.HiddenSize, _kvHeads * _headDim, c.QkvBias);
        o_proj = new Linear(name + ".o_proj", w, _heads * _headDim, c.HiddenSize, c.OProjBias);
        if (c.QkNorm)
        {
            q_norm = new RmsNorm(name + ".q_norm", w, _headDim, c.RmsNormEps);
            k_norm = new RmsNorm(name + ".k_norm", w, _headDim, c.RmsNormEps);
        }
        RegisterComponents();
    }

    /// <summary>Training: RoPE through <see cref="RopeFunction"/> (fused kernels on CUDA bf16).</summary>
    public bool FusedTraining { get; set; }

    public override Tensor forward(Tensor x) => throw new NotSupportedException("call Forward with positions and mask");

    /// <param name="x">[B, T, hidden]</param>
    /// <param name="cos">[B, T, head_dim]</param>
    /// <param name="sin">[B, T, head_dim]</param>
    /// <param name="mask">bool [B or 1, 1, T, S] (true = may attend), or null for plain causal attention without cache.</param>
    /// <param name="stash">In a checkpoint's lean replay, o_proj's output is not read: only its backward runs.</param>
    public Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer, LayerStash? stash = null)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1];
        // RoPE and the GQA repeat (where one is needed) work on the projections' own [B, T, heads, D] layout
        // (contiguous, so the elementwise kernels vectorise); SDPA takes the [B, heads, T, D] views.
        // Training: q/k/v as one group whose backwards sum the input grad in one buffer (see Lora.SharedInputGrad).
        // A checkpoint's replay reuses the outputs its first forward kept, when it kept them (see LayerStash).
        bool replay = stash is { Replaying: true };
        var qkv = FusedTraining && training ? Lora.LoraProjection.ApplyShared(x, [q_proj, k_proj, v_proj], replay ? stash!.Qkv : null) : null;
        qkv ??= [q_proj.forward(x), k_proj.forward(x), v_proj.forward(x)];
        if (stash is { Replaying: false, KeepQkv: true }) stash.KeepQkvOutputs(qkv);
        var q = qkv[0].view(b, t, _heads, _headDim);
        var k = qkv[1].view(b, t, _kvHeads, _headDim);
        var v = qkv[2].view(b, t, _kvHeads, _headDim);
        if (q_norm != null) q = q_norm.forward(q);
        if (k_norm != null) k = k_norm.forward(k);
        // Training on CUDA bf16: RoPE as one fused kernel each way (no-grad passes, such as a checkpointed layer's first
        // forward, run the forward kernel alone).
        bool fusedRope = FusedTraining && training && RopeFunction.Fusable(q, cos, sin) && RopeFunction.Fusable(k, cos, sin);
        if (fusedRope && (q.requires_grad || k.requires_grad)) (q, k) = RopeFunction.Apply(q, k, cos, sin);
        else if (fusedRope) (q, k) = (RopeFunction.Rotate(q, cos, sin), RopeFunction.Rotate(k, cos, sin));
        else (q, k) = (RotaryEmbedding.Apply(q, cos, sin), RotaryEmbedding.Apply(k, cos, sin));
        q = q.transpose(1, 2);
        int rep = _heads / _kvHeads;
        // Plain causal attention (training, unpadded batches): the kernel maps query-head groups onto the kv heads itself.
        bool grouped = rep > 1 && cache == null && mask is null && Runtime.GqaAttention.Available;
        if (cache != null)
        {
            (k, v) = cache.Append(layer, k.transpose(1, 2), v.transpose(1, 2));
            if (rep > 1) (k, v) = (RepeatKv(k, rep), RepeatKv(v, rep));
        }
        else if (rep > 1 && !grouped) (k, v) = (RepeatKvTokensFirst(k, rep).transpose(1, 2), RepeatKvTokensFirst(v, rep).transpose(1, 2));
        else (k, v) = (k.transpose(1, 2), v.transpose(1, 2));
        var attn = grouped ? Runtime.GqaAttention.Causal(q, k, v) : nn.functional.scaled_dot_product_attention(q, k, v, mask, 0.0, mask is null);
        var merged = attn.transpose(1, 2).reshape(b, t, _heads * _headDim);
        var o = replay ? Lora.LoraProjection.Replay(o_proj, merged, null) : o_proj.forward(merged);
        return o.MoveToOuterDisposeScope();
    }

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
