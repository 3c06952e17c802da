using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h)).</summary>
public class DecoderLayer : ContainerModule
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

    /// <summary>The block over <paramref name="x"/> [B, T, hidden]; the other arguments as for <see cref="Attention.Forward"/>.</summary>
    public virtual Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        var h = x + self_attn.Forward(input_layernorm.forward(x), cos, sin, mask, cache, layer);
        var y = h + mlp.forward(post_attention_layernorm.forward(h));
        return y.MoveToOuterDisposeScope();
    }
}
