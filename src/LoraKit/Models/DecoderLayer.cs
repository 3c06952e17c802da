using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h)).</summary>
public sealed class DecoderLayer : nn.Module<Tensor, Tensor>
{
    public Attention self_attn;
    public Mlp mlp;
    public RmsNorm input_layernorm, post_attention_layernorm;

    public DecoderLayer(string name, WeightSource w, ModelConfig c) : base("DecoderLayer")
    {
        self_attn = new Attention(name + ".self_attn", w, c);
        mlp = new Mlp(name + ".mlp", w, c);
        input_layernorm = new RmsNorm(name + ".input_layernorm", w, c.HiddenSize, c.RmsNormEps);
        post_attention_layernorm = new RmsNorm(name + ".post_attention_layernorm", w, c.HiddenSize, c.RmsNormEps);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => throw new NotSupportedException("call Forward with positions and mask");

    /// <param name="stash">While checkpointing with a lean replay: what this no-grad forward keeps (see <see cref="LayerStash"/>).</param>
    public Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer, LayerStash? stash = null)
    {
        using var scope = NewDisposeScope();
        var h = x + self_attn.Forward(input_layernorm.forward(x), cos, sin, mask, cache, layer, stash);
        stash?.KeepMid(h);
        var y = h + mlp.Forward(post_attention_layernorm.forward(h), stash);
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// A checkpoint's lean replay: back-propagates <paramref name="dy"/> through the MLP half from the kept mid-layer
    /// residual, then through the attention half from the input, running neither o_proj's nor down_proj's GEMM (nor
    /// gate/up's when kept). Fills the adapters' grads and returns the input's grad.
    /// </summary>
    public Tensor Replay(Tensor x, Tensor cos, Tensor sin, Tensor? mask, int layer, LayerStash stash, Tensor dy)
    {
        using var scope = NewDisposeScope();
        stash.Replaying = true;
        var h = stash.Mid!.detach().requires_grad_(true);
        var m = mlp.Forward(post_attention_layernorm.forward(h), stash);
        autograd.backward([m], [dy]);
        var dh = h.grad!.add_(dy);                                    // the MLP's path plus the residual's own
        Runtime.Cuda.MemoryTrace.Mark("backward layer {0} mlp", layer, dy.device);
        var input = x.detach().requires_grad_(true);
        var o = self_attn.Forward(input_layernorm.forward(input), cos, sin, mask, null, layer, stash);
        autograd.backward([o], [dh]);
        return dh.add_(input.grad!).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Whether <see cref="Replay"/> applies: the fused training path with every projection a frozen base with at most one
    /// adapter and no dropout (the replay runs the halves in reverse order, so dropout masks would not repeat).
    /// </summary>
    public bool LeanReplayable =>
        mlp.FusedTraining && self_attn.FusedTraining && training &&
        new[] { self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj }
            .All(p => Lora.LoraProjection.TryResolve(p, out _, out _));
}
