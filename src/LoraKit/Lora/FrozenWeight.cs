using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// The base weight W [out, in] a fused projection multiplies by, for the duration of one GEMM: the dense parameter
/// itself, or — on a quantized base — the packed weight dequantized into a temporary in the activations' dtype
/// (through the layer's packed module, so a fast kernel swapped in there is used), freed when this is disposed. The
/// projections' backwards ask again rather than keep it, so no layer's 16-bit W outlives its GEMM.
/// </summary>
internal readonly struct FrozenWeight : IDisposable
{
    readonly Tensor? _temporary;

    /// <summary>W to multiply by now.</summary>
    public Tensor W { get; }

    /// <summary>W of <paramref name="layer"/> in <paramref name="dtype"/> (the dense parameter is used as it is).</summary>
    public FrozenWeight(Models.Linear layer, ScalarType dtype)
    {
        _temporary = layer.IsQuantized ? layer.EffectiveWeight(dtype) : null;
        W = _temporary ?? layer.weight;
    }

    /// <inheritdoc/>
    public void Dispose() => _temporary?.Dispose();
}
