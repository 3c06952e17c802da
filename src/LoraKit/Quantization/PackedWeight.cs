using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// The frozen weight of a base linear layer kept in bitsandbytes' packed storage (4-bit NF4/FP4 with absmax and its
/// double quantization, or int8 with SCB row scales) as registered buffers of this module, so the model's buffers are
/// the packed bytes and nothing else. The layer computes through <see cref="Linear"/>: the reference form dequantizes
/// the whole weight into the input's dtype for one call and drops it (QLoRA's reference numerics, the oracle of any fast
/// path). This is the one extension point of the fast path: a fused dequantize-GEMM kernel is a subclass over the same
/// buffers that overrides <see cref="Linear"/>, swapped in from <c>Accelerated</c> as the other fast modules are.
/// Frozen: no gradient reaches the weight; the input's gradient flows through the dequantized weight.
/// </summary>
public abstract class PackedWeight : nn.Module
{
    /// <summary>A module over packed buffers; <paramref name="shape"/> is the dense weight's [out, in].</summary>
    protected PackedWeight(string name, long[] shape) : base(name) { Shape = shape; }

    /// <summary>The dense weight's shape, [out_features, in_features].</summary>
    public long[] Shape { get; }

    /// <summary>"nf4", "fp4" or "int8".</summary>
    public abstract string Method { get; }

    /// <summary>The dense weight in <paramref name="dtype"/> on the buffers' device (a new tensor; the reference dequantization in fp32, then cast).</summary>
    public abstract Tensor Dequantize(ScalarType dtype);

    /// <summary>Bytes the packed storage holds (all buffers).</summary>
    public long StorageBytes => buffers().Sum(b => b.numel() * b.ElementSize);

    /// <summary>
    /// y = x·Wᵀ + b with W dequantized for this call in x's dtype (reference path). Autograd keeps the dequantized W
    /// for the input's gradient until backward; a fused kernel re-dequantizes in backward instead.
    /// </summary>
    public virtual Tensor Linear(Tensor x, Tensor? bias)
    {
        using var scope = NewDisposeScope();
        Tensor w;
        using (no_grad()) w = Dequantize(x.dtype);
        return nn.functional.linear(x, w, bias).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Quantizes a dense [out, in] weight with <paramref name="options"/> on its own device (the caller drops the dense
    /// tensor afterwards: load one tensor, quantize, drop).
    /// </summary>
    public static PackedWeight Quantize(Tensor w, BnbQuantizeOptions options)
    {
        if (options.Method == "int8") return new PackedInt8Weight(Int8RowWise.Quantize(w));
        return new Packed4BitWeight(Blockwise4Bit.Quantize(w, options.Method, options.Blocksize, options.DoubleQuant));
    }
}

/// <summary>
/// A 4-bit (NF4/FP4) packed weight: buffers <c>data</c> (uint8, two codes a byte), <c>absmax</c> (fp32, or uint8 codes
/// when double-quantized), <c>quant_map</c>, and with double quantization <c>nested_absmax</c> and
/// <c>nested_quant_map</c> — bnb's <c>P.weight</c>, <c>P.weight.absmax</c>, … — plus the <see cref="QuantState"/>.
/// </summary>
public class Packed4BitWeight : PackedWeight
{
    /// <summary>The quant state (method, block size, original dtype and shape, double-quantization offset).</summary>
    public QuantState State { get; }

    /// <summary>Takes ownership of <paramref name="q"/>'s tensors as this module's buffers.</summary>
    public Packed4BitWeight(Quantized4Bit q) : base("Packed4BitWeight", q.State.shape)
    {
        if (q.State.shape.Length != 2) throw new ArgumentException($"a linear weight is 2-D, the quant state says [{string.Join(", ", q.State.shape)}]");
        State = q.State;
        // Detached from any dispose scope the load runs in: the buffers live as long as the module.
        register_buffer("data", q.Data.reshape(-1).DetachFromDisposeScope());
        register_buffer("absmax", q.Absmax.DetachFromDisposeScope());
        register_buffer("quant_map", q.QuantMap.DetachFromDisposeScope());
        if (q.NestedAbsmax is { } na) register_buffer("nested_absmax", na.DetachFromDisposeScope());
        if (q.NestedQuantMap is { } nm) register_buffer("nested_quant_map", nm.DetachFromDisposeScope());
    }

    /// <summary>A module over <paramref name="other"/>'s buffers (shared, not copied), for a fast subclass swapped in after build.</summary>
    protected Packed4BitWeight(Packed4BitWeight other) : base("Packed4BitWeight", other.Shape)
    {
        State = other.State;
        foreach (var (name, b) in other.named_buffers(recurse: false)) register_buffer(name, b);
    }

    /// <inheritdoc/>
    public override string Method => State.quant_type;

    /// <summary>
    /// The storage as bnb's record over this module's buffers (a view: do not dispose it), for writers and kernels that
    /// read the packed bytes directly.
    /// </summary>
    public Quantized4Bit Storage => new(get_buffer("data")!, get_buffer("absmax")!, get_buffer("quant_map")!,
        State.Nested ? get_buffer("nested_absmax") : null, State.Nested ? get_buffer("nested_quant_map") : null, State);

    /// <inheritdoc/>
    public override Tensor Dequantize(ScalarType dtype)
    {
        using var w = Blockwise4Bit.Dequantize(Storage);
        return w.to(dtype);
    }
}

/// <summary>An LLM.int8-storage weight: buffers <c>data</c> (int8 [out, in]) and <c>SCB</c> (fp32 row absmax).</summary>
public class PackedInt8Weight : PackedWeight
{
    /// <summary>Takes ownership of <paramref name="q"/>'s tensors as this module's buffers.</summary>
    public PackedInt8Weight(Int8Weight q) : base("PackedInt8Weight", q.Weight.shape)
    {
        register_buffer("data", q.Weight.DetachFromDisposeScope());
        register_buffer("SCB", q.Scb.DetachFromDisposeScope());
    }

    /// <summary>A module over <paramref name="other"/>'s buffers (shared, not copied), for a fast subclass swapped in after build.</summary>
    protected PackedInt8Weight(PackedInt8Weight other) : base("PackedInt8Weight", other.Shape)
    {
        foreach (var (name, b) in other.named_buffers(recurse: false)) register_buffer(name, b);
    }

    /// <inheritdoc/>
    public override string Method => "int8";

    /// <summary>The storage over this module's buffers (a view: do not dispose it).</summary>
    public Int8Weight Storage => new(get_buffer("data")!, get_buffer("SCB")!);

    /// <inheritdoc/>
    public override Tensor Dequantize(ScalarType dtype)
    {
        using var w = Int8RowWise.Dequantize(Storage);
        return w.to(dtype);
    }
}
