using LoraKit.Models;
using LoraKit.Quantization;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// The fast path of a quantized base (llm.c's .cu beside its .c): each packed layer's weight is swapped for a subclass
/// over the same buffers whose <see cref="PackedWeight.Dequantize"/> runs one CUDA kernel
/// (<see cref="DequantKernels"/>, bit-identical to the reference ops) and whose <see cref="PackedWeight.Linear"/> keeps
/// no dequantized weight from forward to backward (<see cref="DequantLinear"/>). The adapters' fused projections
/// (<c>Lora.LoraProjection</c>, <c>Lora.SwiGluDown</c>) get W through the same Dequantize, so on CUDA a training step
/// holds at most a layer's worth of 16-bit weights at a time, never the model's. Off the GPU the reference stays.
/// </summary>
public static class KernelPackedWeights
{
    /// <summary>
    /// Swaps the kernel-backed weights into every packed layer of <paramref name="model"/> on CUDA. Returns a line for
    /// the log, or null when the model has no packed layers or is not on CUDA.
    /// </summary>
    public static string? Apply(CausalLM model)
    {
        var layers = model.modules().OfType<Linear>().Where(l => l.IsQuantized).ToList();
        if (layers.Count == 0 || model.Device.type != TorchSharp.DeviceType.CUDA) return null;
        if (!DequantKernels.Usable(model.Device))
            return "quantized layers: dequantized with TorchSharp ops per forward (the CUDA dequantization kernel is not available)";
        int swapped = layers.Count(Swap);
        return $"quantized layers: {layers.Count} packed {layers[0].Packed!.Method} weights dequantized per use by a CUDA kernel" +
            (swapped < layers.Count ? $" ({swapped} swapped now)" : "") + ", none kept between forward and backward";
    }

    /// <summary>Puts the kernel-backed subclass in place of <paramref name="layer"/>'s packed weight; false when it is there already.</summary>
    public static bool Swap(Linear layer)
    {
        if (layer.Packed is not { } packed || KernelTwin(packed) is not { } fast) return false;
        layer.ReplacePacked(fast);
        return true;
    }

    /// <summary>The kernel-backed subclass over <paramref name="packed"/>'s buffers (null: it is one already, or of a kind with no kernel).</summary>
    public static PackedWeight? KernelTwin(PackedWeight packed) => packed switch
    {
        Kernel4Bit or KernelInt8 => null,
        Packed4BitWeight p => new Kernel4Bit(p),
        PackedInt8Weight p => new KernelInt8(p),
        _ => null,
    };

    /// <summary>
    /// The kernels read raw device buffers: one that is strided or not on the codes' device (never seen from a load)
    /// takes the reference path rather than a wrong address. The buffers never change, so each weight decides once.
    /// </summary>
    static bool OnDevice(Tensor first, params Tensor?[] rest) =>
        first.is_contiguous() && rest.All(t => t is null || (t.is_contiguous() && t.device_type == first.device_type && t.device_index == first.device_index));

    /// <summary>A 4-bit weight dequantized by <see cref="DequantKernels.Dequantize4Bit"/> on CUDA.</summary>
    sealed class Kernel4Bit : Packed4BitWeight
    {
        readonly Tensor _table;
        readonly Tensor? _nestedMap;
        readonly Device _device;
        readonly bool _readable; // the storage's dtypes and layout are the kernel's

        public Kernel4Bit(Packed4BitWeight reference) : base(reference)
        {
            // The table the reference dequantizes with (bnb's built-in one for the type; the stored quant_map is informational).
            using var table = Codebooks.For4Bit(State.quant_type);
            var s = Storage;
            _device = s.Data.device;
            _table = table.to(ScalarType.Float32, _device).contiguous().DetachFromDisposeScope();
            // The kernel reads raw device addresses: every table it reads must be on the codes' device, as fp32.
            _nestedMap = State.Nested ? s.NestedQuantMap!.to(ScalarType.Float32, _device).contiguous().DetachFromDisposeScope() : null;
            bool types = s.Data.dtype == ScalarType.Byte && (State.Nested
                ? s.Absmax.dtype == ScalarType.Byte && s.NestedAbsmax!.dtype == ScalarType.Float32
                : s.Absmax.dtype == ScalarType.Float32);
            _readable = types && OnDevice(s.Data, s.Absmax, s.NestedAbsmax);
        }

        public override Tensor Dequantize(ScalarType dtype)
        {
            if (!_readable || !DequantKernels.Usable(_device)) return base.Dequantize(dtype);
            var s = Storage;
            return DequantKernels.Dequantize4Bit(s.Data, s.Absmax, _table, s.NestedAbsmax, _nestedMap,
                (float)(State.nested_offset ?? 0), State.blocksize, State.nested_blocksize ?? Blockwise4Bit.NestedBlocksize, State.shape, dtype);
        }

        public override Tensor Linear(Tensor x, Tensor? bias) => DequantLinear.Apply(x, this, bias);
    }

    /// <summary>An int8 weight dequantized by <see cref="DequantKernels.DequantizeInt8"/> on CUDA.</summary>
    sealed class KernelInt8 : PackedInt8Weight
    {
        readonly Device _device;
        readonly bool _readable; // the storage's dtypes and layout are the kernel's

        public KernelInt8(PackedInt8Weight reference) : base(reference)
        {
            var s = Storage;
            _device = s.Weight.device;
            _readable = s.Weight.dtype == ScalarType.Int8 && s.Scb.dtype == ScalarType.Float32 && OnDevice(s.Weight, s.Scb);
        }

        public override Tensor Dequantize(ScalarType dtype)
        {
            if (!_readable || !DequantKernels.Usable(_device)) return base.Dequantize(dtype);
            var s = Storage;
            return DequantKernels.DequantizeInt8(s.Weight, s.Scb, Int8RowWise.InverseOf127, dtype);
        }

        public override Tensor Linear(Tensor x, Tensor? bias) => DequantLinear.Apply(x, this, bias);
    }
}
