using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// A checkpointed <see cref="DecoderLayer"/>'s lean forward and replay (see <see cref="LayerStash"/>): the forward is
/// <see cref="DecoderLayer.Forward"/> keeping what the stash asks for; the replay back-propagates the MLP half from the
/// kept mid-layer residual, then the attention half from the input, running neither o_proj's nor down_proj's GEMM (nor
/// gate/up's or q/k/v's when kept). Both spell out the block's two residual halves, so they apply only to a layer that
/// is exactly that block (<see cref="Applies"/>).
/// </summary>
public static class LeanLayer
{
    /// <summary>
    /// Whether the lean replay applies: a plain pre-norm block on the fused training path with every projection a frozen
    /// base with at most one adapter and no dropout (the replay runs the halves in reverse order, so dropout masks would
    /// not repeat).
    /// </summary>
    public static bool Applies(DecoderLayer layer) =>
        layer.GetType() == typeof(DecoderLayer) && layer.training &&
        layer.self_attn is FastAttention { Fused: true } attn && layer.mlp is FastMlp mlp &&
        new[] { attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj }
            .All(p => p is not null && LoraProjection.TryResolve(p, out _, out _));

    /// <summary>The layer's forward (no grad: a checkpoint's first pass), keeping the mid-layer residual and what else the stash asks for.</summary>
    public static Tensor Forward(DecoderLayer layer, Tensor x, Tensor cos, Tensor sin, Tensor? mask, int index, LayerStash stash)
    {
        using var scope = NewDisposeScope();
        var (attn, mlp) = ((FastAttention)layer.self_attn, (FastMlp)layer.mlp);
        var h = x.Plus(attn.Forward(layer.input_layernorm.forward(x), cos, sin, mask, null, index, stash));
        stash.KeepMid(h);
        var y = h.Plus(mlp.Forward(layer.post_attention_layernorm.forward(h), stash));
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Back-propagates <paramref name="dy"/> through the layer from what <see cref="Forward"/> kept: fills the adapters'
    /// grads and returns the input's grad.
    /// </summary>
    public static Tensor Replay(DecoderLayer layer, Tensor x, Tensor cos, Tensor sin, Tensor? mask, int index, LayerStash stash, Tensor dy)
    {
        using var scope = NewDisposeScope();
        var (attn, mlp) = ((FastAttention)layer.self_attn, (FastMlp)layer.mlp);
        stash.Replaying = true;
        var h = stash.Mid!.detach().requires_grad_(true);
        var m = mlp.Forward(layer.post_attention_layernorm.forward(h), stash);
        autograd.backward([m], [dy]);
        var dh = h.grad!.PlusInPlace(dy);                                    // the MLP's path plus the residual's own
        MemoryTrace.Mark("backward layer {0} mlp", index, dy.device);
        var input = x.detach().requires_grad_(true);
        var o = attn.Forward(layer.input_layernorm.forward(input), cos, sin, mask, null, index, stash);
        autograd.backward([o], [dh]);
        return dh.PlusInPlace(input.grad!).MoveToOuterDisposeScope();
    }
}
