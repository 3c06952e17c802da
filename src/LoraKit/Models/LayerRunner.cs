using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// How a <see cref="DecoderModel"/> runs its stack of layers between the embeddings and the final norm. The default,
/// <see cref="PlainLayerRunner"/>, is the plain loop; training may plug in another one (activation checkpointing, for
/// instance) that must compute the same hidden states. A runner that holds resources is disposed with its model.
/// </summary>
public interface ILayerRunner
{
    /// <summary>The last layer's output for the first layer's input <paramref name="h"/> [B, T, hidden].</summary>
    /// <param name="cos">Each layer's RoPE cos (layers of one type share one), as <paramref name="sin"/>.</param>
    /// <param name="masks">Each layer's attention mask (null: plain causal attention); layers of one kind share one.</param>
    Tensor Run(DecoderModel model, Tensor h, Tensor[] cos, Tensor[] sin, Tensor?[] masks, KvCache? cache);
}

/// <summary>Runs each layer in turn on the previous one's output.</summary>
public sealed class PlainLayerRunner : ILayerRunner
{
    /// <summary>The one instance (the runner holds no state).</summary>
    public static readonly PlainLayerRunner Instance = new();

    PlainLayerRunner() { }

    public Tensor Run(DecoderModel model, Tensor h, Tensor[] cos, Tensor[] sin, Tensor?[] masks, KvCache? cache)
    {
        for (int i = 0; i < model.layers.Count; i++) h = model.layers[i].Forward(h, cos[i], sin[i], masks[i], cache, i);
        return h;
    }
}
