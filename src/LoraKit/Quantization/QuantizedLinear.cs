using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// y = x·Wᵀ + b where W stays packed in 4 bits (a <see cref="Quantized4Bit"/>) and is dequantized for each forward in
/// the input's dtype and device — the reference (CPU) form of a QLoRA base layer, and the oracle for a fused CUDA
/// dequantize-GEMM. Holds no 16-bit copy between calls: memory is the packed bytes plus absmax. Frozen (no gradients
/// to W; gradients flow to x). Not yet wired into the model builder (<c>Models.Linear</c> keeps a dense weight): a
/// first step of issue 20's packed path, usable on its own.
/// </summary>
public sealed class QuantizedLinear : nn.Module<Tensor, Tensor>
{
    readonly Quantized4Bit _q;
    readonly Tensor? _bias;

    /// <summary>A layer over <paramref name="q"/> (whose state shape is [out, in]); the layer owns and disposes both tensors' holders.</summary>
    public QuantizedLinear(string name, Quantized4Bit q, Tensor? bias = null) : base(name)
    {
        if (q.State.shape.Length != 2) throw new ArgumentException($"a linear weight is 2-D, the quant state says [{string.Join(", ", q.State.shape)}]");
        _q = q;
        _bias = bias;
    }

    /// <summary>in_features.</summary>
    public long InFeatures => _q.State.shape[1];

    /// <summary>out_features.</summary>
    public long OutFeatures => _q.State.shape[0];

    /// <summary>The packed storage (for serialization and for kernels that read it directly).</summary>
    public Quantized4Bit Storage => _q;

    /// <summary>The weight as the layer computes with it, in <paramref name="dtype"/> (a new tensor).</summary>
    public Tensor DequantizedWeight(ScalarType dtype)
    {
        using var w = Blockwise4Bit.Dequantize(_q);
        return w.to(dtype);
    }

    /// <inheritdoc/>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        Tensor w;
        using (no_grad()) w = Blockwise4Bit.Dequantize(_q).to(x.dtype, x.device);
        var y = nn.functional.linear(x, w, _bias?.to(x.dtype, x.device));
        return y.MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing) { _q.Dispose(); _bias?.Dispose(); }
        base.Dispose(disposing);
    }
}
