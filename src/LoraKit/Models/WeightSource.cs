using LoraKit.IO;
using LoraKit.Quantization;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// Hands checkpoint tensors to the modules that are being built, checking each name and shape against what the
/// config implies. After the model is built, <see cref="EnsureAllUsed"/> rejects tensors nobody asked for, so loading
/// is a strict name-for-name match (as in nanoGPT's from_pretrained).
/// </summary>
public abstract class WeightSource
{
    readonly HashSet<string> _taken = new(StringComparer.Ordinal);

    public ScalarType DType { get; }
    public Device Device { get; }

    protected WeightSource(ScalarType dtype, Device device) { DType = dtype; Device = device; }

    /// <summary>The frozen parameter for <paramref name="name"/>, which must have exactly <paramref name="shape"/>.</summary>
    public Parameter Take(string name, params long[] shape)
    {
        _taken.Add(name);
        var t = Load(name, shape);
        return new Parameter(t, requires_grad: false);
    }

    protected abstract Tensor Load(string name, long[] shape);

    /// <summary>
    /// The packed weight of linear layer weight <paramref name="name"/> [out, in] when this source quantizes it (a
    /// pre-quantized checkpoint's weight, or quantize-on-load), else null: the caller then takes a dense parameter.
    /// </summary>
    public PackedWeight? TakePacked(string name, long outFeatures, long inFeatures)
    {
        var packed = LoadPacked(name, [outFeatures, inFeatures]);
        if (packed is not null) _taken.Add(name);
        return packed;
    }

    /// <summary>See <see cref="TakePacked"/>; dense by default.</summary>
    protected virtual PackedWeight? LoadPacked(string name, long[] shape) => null;

    public virtual void EnsureAllUsed() { }

    protected bool WasTaken(string name) => _taken.Contains(name);

    protected static string Shape(long[] s) => "[" + string.Join(", ", s) + "]";
}

/// <summary>
/// Weights from a checkpoint's safetensors files. A linear weight stored by bitsandbytes (4-bit NF4/FP4 or LLM.int8,
/// detected by its quant_state / SCB keys) loads packed, as stored; with <see cref="Quantize"/> set, the linear weights
/// of a full-precision checkpoint are quantized one tensor at a time as they load (read one tensor onto the device,
/// quantize it there, drop the dense copy), so the whole model never exists in 16 bits on the device. The LM head and
/// embeddings stay dense (transformers keeps them unquantized). Companion tensors of quantized weights count as used.
/// </summary>
public sealed class CheckpointWeights(CheckpointFiles files, ScalarType dtype, Device device, IEnumerable<string>? ignorable = null)
    : WeightSource(dtype, device)
{
    readonly HashSet<string> _ignorable = new(ignorable ?? [], StringComparer.Ordinal);

    /// <summary>Quantize full-precision linear weights on load with these options (null: load them dense).</summary>
    public BnbQuantizeOptions? Quantize { get; init; }

    /// <summary>
    /// Load bitsandbytes-stored weights dequantized into dense tensors of the compute dtype instead of packed: what a merge
    /// writes into (a dense checkpoint of dequantized base + delta) and what the reference tests compare against.
    /// </summary>
    public bool Dequantize { get; init; }

    /// <summary>Whether a linear weight is quantized on load: every decoder linear, never the LM head (as transformers).</summary>
    public static bool QuantizableOnLoad(string name) => !name.StartsWith("lm_head.", StringComparison.Ordinal);

    protected override PackedWeight? LoadPacked(string name, long[] shape)
    {
        if (!files.Contains(name)) return null; // Load reports the missing tensor
        var kind = BnbCheckpoint.KindOf(files, name);
        if (kind != BnbKind.None && Dequantize) return null; // Load dequantizes it
        if (kind == BnbKind.None)
            return Quantize is { } o && QuantizableOnLoad(name) && files.Entry(name).Shape.SequenceEqual(shape) ? QuantizeOnLoad(name, o) : null;
        _quantized.Add(name);
        PackedWeight packed = kind == BnbKind.FourBit ? new Packed4BitWeight(OnDevice(BnbCheckpoint.Read4Bit(files, name)))
            : new PackedInt8Weight(OnDevice(BnbCheckpoint.ReadInt8(files, name)));
        if (!packed.Shape.SequenceEqual(shape))
        {
            packed.Dispose();
            throw new InvalidDataException($"{files.PathOf(name)}: quantized tensor '{name}' has shape {Shape(packed.Shape)} but the config implies {Shape(shape)}");
        }
        return packed;
    }

    /// <summary>Reads the weight in its stored dtype onto the device, checks it, quantizes it there and drops it.</summary>
    PackedWeight QuantizeOnLoad(string name, BnbQuantizeOptions o)
    {
        var stored = IO.DTypes.ToScalarType(files.Entry(name).DType);
        if (stored is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16))
            throw new SafetensorsException(files.PathOf(name), $"tensor '{name}' has dtype {files.Entry(name).DType}; quantizing on load takes F32, BF16 or F16 weights");
        using var dense = files.Read(name, stored.Value, Device);
        if (!AllFinite(dense)) throw new LoraKitException($"checkpoint tensor '{name}' contains NaN or infinite values; refusing a base model with non-finite weights");
        return PackedWeight.Quantize(dense, o);
    }

    Quantized4Bit OnDevice(Quantized4Bit q) => Device.type == TorchSharp.DeviceType.CPU ? q
        : Moved(q, () => new Quantized4Bit(q.Data.to(Device), q.Absmax.to(Device), q.QuantMap.to(Device), q.NestedAbsmax?.to(Device), q.NestedQuantMap?.to(Device), q.State));

    Int8Weight OnDevice(Int8Weight q) => Device.type == TorchSharp.DeviceType.CPU ? q : Moved(q, () => new Int8Weight(q.Weight.to(Device), q.Scb.to(Device)));

    static T Moved<T>(IDisposable cpu, Func<T> move) { using (cpu) return move(); }

    protected override Tensor Load(string name, long[] shape)
    {
        if (!files.Contains(name))
            throw new InvalidDataException($"checkpoint is missing tensor '{name}' (expected shape {Shape(shape)})");
        if (BnbCheckpoint.KindOf(files, name) != BnbKind.None) return LoadQuantized(name, shape);
        var e = files.Entry(name);
        if (!e.Shape.SequenceEqual(shape))
            throw new InvalidDataException($"{files.PathOf(name)}: tensor '{name}' has shape {Shape(e.Shape)} but the config implies {Shape(shape)}");
        // Integer and bool tensors under a weight's name are quantized or foreign checkpoints; casting them to float
        // would run a silently wrong model.
        if (e.DType is not ("F32" or "F16" or "BF16" or "F64"))
            throw new SafetensorsException(files.PathOf(name), $"tensor '{name}' has dtype {e.DType}; model weights must be floating point (F32, BF16, F16, F64)");
        var t = files.Read(name, DType, Device);
        if (!AllFinite(t))
        {
            t.Dispose();
            throw new LoraKitException($"checkpoint tensor '{name}' contains NaN or infinite values; refusing a base model with non-finite weights");
        }
        return t;
    }

    /// <summary>
    /// A bitsandbytes-quantized weight (pre-quantized checkpoints load without flags), dequantized to fp32 and then to the
    /// compute dtype: the reference path, the weights the quantized model computes with.
    /// </summary>
    Tensor LoadQuantized(string name, long[] shape)
    {
        _quantized.Add(name);
        using var w = BnbCheckpoint.Dequantize(files, name);
        if (!w.shape.SequenceEqual(shape))
            throw new InvalidDataException($"{files.PathOf(name)}: quantized tensor '{name}' has shape {Shape(w.shape)} but the config implies {Shape(shape)}");
        if (!AllFinite(w)) throw new LoraKitException($"checkpoint tensor '{name}' dequantizes to NaN or infinite values; refusing a base model with non-finite weights");
        return w.to(DType, Device);
    }

    readonly List<string> _quantized = [];

    /// <summary>Whether every element is finite, checked in chunks so the temporary mask stays small.</summary>
    static bool AllFinite(Tensor t)
    {
        if (!t.is_floating_point() || t.numel() == 0) return true;
        using var scope = NewDisposeScope();
        var flat = t.reshape(-1);
        const long chunk = 1 << 24;
        for (long start = 0; start < flat.shape[0]; start += chunk)
            if (!isfinite(flat.narrow(0, start, Math.Min(chunk, flat.shape[0] - start))).all().item<bool>()) return false;
        return true;
    }

    public override void EnsureAllUsed()
    {
        // Old checkpoints store the rotary inverse frequencies as buffers; they are recomputed from the config.
        var companions = _quantized.SelectMany(n => BnbCheckpoint.CompanionNames(files, n)).ToHashSet(StringComparer.Ordinal);
        var unexpected = files.Names.Where(n => !WasTaken(n) && !_ignorable.Contains(n) && !companions.Contains(n) && !n.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal))
            .OrderBy(n => n, StringComparer.Ordinal).ToList();
        if (unexpected.Count > 0)
            throw new InvalidDataException($"checkpoint has unexpected tensor '{unexpected[0]}'" +
                (unexpected.Count > 1 ? $" (and {unexpected.Count - 1} more)" : "") + " that the config does not account for");
    }
}

/// <summary>
/// Random weights of the right shapes (for shape tests and benchmarks of random-init models). With <see cref="Quantize"/>
/// the linear weights (not lm_head) are drawn on the device one at a time and quantized there at once, so a model far
/// larger than device memory in 16 bits (a 70B benchmark) is built directly in 4 bits.
/// </summary>
public sealed class RandomWeights(ScalarType dtype, Device device, long seed = 0, double std = 0.02) : WeightSource(dtype, device)
{
    readonly long _seed = seed;
    readonly Generator _gen = new((ulong)seed);
    bool _deviceSeeded;

    /// <summary>Quantize the linear weights as they are made (null: dense).</summary>
    public BnbQuantizeOptions? Quantize { get; init; }

    protected override Tensor Load(string name, long[] shape)
    {
        if (name.EndsWith("norm.weight", StringComparison.Ordinal)) return ones(shape, DType, Device);
        if (name.EndsWith(".bias", StringComparison.Ordinal)) return zeros(shape, DType, Device);
        using var t = randn(shape, ScalarType.Float32, generator: _gen).Times(std);
        return t.to(DType, Device);
    }

    protected override PackedWeight? LoadPacked(string name, long[] shape)
    {
        if (Quantize is not { } o || !CheckpointWeights.QuantizableOnLoad(name)) return null;
        // Drawn on the device (the host generator would take minutes for 70B weights) from the device's default generator,
        // seeded once here (TorchSharp 0.107 makes only host Generator objects), in the compute dtype as a checkpoint's.
        if (Device.type == TorchSharp.DeviceType.CUDA && !_deviceSeeded) { cuda.manual_seed(_seed); _deviceSeeded = true; }
        using var drawn = Device.type == TorchSharp.DeviceType.CUDA ? randn(shape, ScalarType.Float32, Device) : randn(shape, ScalarType.Float32, generator: _gen);
        using var dense = drawn.mul_(std).to(DType, Device); // both disposed here: a 70B build must not wait for the GC
        return PackedWeight.Quantize(dense, o);
    }
}
