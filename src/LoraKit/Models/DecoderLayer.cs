using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>
/// Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h)). With <see cref="ModelConfig.PostNorms"/> (Gemma)
/// each half's output is normalised too before its residual add: h = x + norm(attn(norm(x))), y = h + norm(mlp(norm(h))),
/// where post_attention_layernorm is the attention's output norm and pre_feedforward_layernorm the MLP's input norm.
/// </summary>
public class DecoderLayer : ContainerModule
{
    public Attention self_attn;
    public Mlp mlp;
    public RmsNorm input_layernorm, post_attention_layernorm;
    public RmsNorm? pre_feedforward_layernorm, post_feedforward_layernorm;

    public DecoderLayer(string name, WeightSource w, ModelConfig c) : base("DecoderLayer")
    {
        self_attn = new Attention(name + ".self_attn", w, c);
        mlp = new Mlp(name + ".mlp", w, c);
        input_layernorm = new RmsNorm(name + ".input_layernorm", w, c.HiddenSize, c.RmsNormEps, c.Norm);
        post_attention_layernorm = new RmsNorm(name + ".post_attention_layernorm", w, c.HiddenSize, c.RmsNormEps, c.Norm);
        if (c.PostNorms)
        {
            pre_feedforward_layernorm = new RmsNorm(name + ".pre_feedforward_layernorm", w, c.HiddenSize, c.RmsNormEps, c.Norm);
            post_feedforward_layernorm = new RmsNorm(name + ".post_feedforward_layernorm", w, c.HiddenSize, c.RmsNormEps, c.Norm);
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => throw new NotSupportedException("call Forward with positions and mask");

    /// <summary>The block over <paramref name="x"/> [B, T, hidden]; the other arguments as for <see cref="Attention.Forward"/>.</summary>
    public virtual Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        var attn = self_attn.Forward(input_layernorm.forward(x), cos, sin, mask, cache, layer);
        Tensor y;
        if (pre_feedforward_layernorm is null || post_feedforward_layernorm is null)
        {
            var h = x.Plus(attn);
            y = h.Plus(mlp.forward(post_attention_layernorm.forward(h)));
        }
        else
        {
            var h = x.Plus(post_attention_layernorm.forward(attn));
            y = h.Plus(post_feedforward_layernorm.forward(mlp.forward(pre_feedforward_layernorm.forward(h))));
        }
        return y.MoveToOuterDisposeScope();
    }
}
