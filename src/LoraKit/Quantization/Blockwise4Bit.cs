using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// One 4-bit weight in bitsandbytes' storage: the packed codes and the tensors of its quant state, named as bnb names
/// them under <c>P.weight.*</c>. <see cref="Absmax"/> is fp32 per block, or — double-quantized — uint8 codes of
/// (absmax − offset) with <see cref="NestedAbsmax"/> and <see cref="NestedQuantMap"/>. <see cref="Data"/> is the flat
/// uint8 bytes, two codes each, the first element in the high nibble. The tensors belong to this record's owner.
/// </summary>
public sealed record Quantized4Bit(Tensor Data, Tensor Absmax, Tensor QuantMap, Tensor? NestedAbsmax, Tensor? NestedQuantMap, QuantState State)
    : IDisposable
{
    /// <summary>The fp32 absmax per block (undoing the double quantization when there is one).</summary>
    public Tensor AbsmaxFloat()
    {
        if (!State.Nested) return Absmax.to(ScalarType.Float32);
        using var scope = NewDisposeScope();
        var a = DynamicBlockwise.Dequantize(Absmax, NestedAbsmax!, NestedQuantMap!, State.nested_blocksize!.Value);
        var offset = tensor((float)State.nested_offset!.Value); // bnb: torch.tensor(float(nested_offset)), fp32
        return (a + offset).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        Data.Dispose(); Absmax.Dispose(); QuantMap.Dispose(); NestedAbsmax?.Dispose(); NestedQuantMap?.Dispose();
    }
}

/// <summary>
/// bnb's blockwise 4-bit quantization (<c>quantize_4bit</c> / <c>dequantize_4bit</c>) for NF4 and FP4. The weight is
/// flattened in row-major order and cut into blocks of <c>blocksize</c> values (the last may be partial); each block is
/// scaled by the fp32 reciprocal of its absmax and each value gets a 4-bit code by the pivots of bnb's CUDA kernels
/// (<see cref="Codebooks"/>): nearest table value, a value exactly on a pivot going to the smaller magnitude (FP4) or
/// the lower value (NF4); FP4's sign bit is set for x &lt; 0. Codes are packed two per byte, first element high.
/// Double quantization stores absmax − mean(absmax) with <see cref="DynamicBlockwise"/> (the signed dynamic map,
/// blocks of 256). Dequantization uses the built-in table for the quant type, as bnb does (the stored quant_map is
/// informational). Pure tensor ops, fp32.
/// </summary>
public static class Blockwise4Bit
{
    /// <summary>bnb's block size for the double quantization of absmax.</summary>
    public const int NestedBlocksize = 256;

    /// <summary>Quantizes <paramref name="w"/> (any float dtype and shape) to NF4 or FP4.</summary>
    public static Quantized4Bit Quantize(Tensor w, string quantType = "nf4", int blocksize = 64, bool doubleQuant = true)
    {
        if (quantType is not ("nf4" or "fp4")) throw new ArgumentException($"unknown 4-bit quant_type '{quantType}' (expected nf4 or fp4)");
        if (!QuantState.ValidBlocksizes.Contains(blocksize))
            throw new ArgumentException($"blocksize {blocksize} is not one bitsandbytes supports ({string.Join(", ", QuantState.ValidBlocksizes)})");
        using var scope = NewDisposeScope();
        var (blocks, n) = Blocks.Split(w, blocksize);
        var absmax = blocks.abs().amax([1]);
        var scaled = Blocks.Scale(blocks, absmax).reshape(-1);
        var codes = quantType == "nf4" ? Nf4Codes(scaled) : Fp4Codes(scaled);
        var data = Pack(codes.narrow(0, 0, n));
        var state = new QuantState(quantType, blocksize, DtypeName(w.dtype), w.shape.ToArray());
        Tensor storedAbsmax = absmax, quantMap = Codebooks.For4Bit(quantType).to(w.device); // the state's tensors live beside the codes
        Tensor? nestedAbsmax = null, nestedMap = null;
        if (doubleQuant)
        {
            var offset = absmax.mean();
            nestedMap = Codebooks.DynamicSigned().to(w.device);
            (storedAbsmax, nestedAbsmax) = DynamicBlockwise.Quantize(absmax - offset, nestedMap, NestedBlocksize);
            state = state with { nested_blocksize = NestedBlocksize, nested_dtype = "float32", nested_offset = offset.item<float>() };
        }
        var q = new Quantized4Bit(data, storedAbsmax, quantMap, nestedAbsmax, nestedMap, state);
        foreach (var t in new[] { data, storedAbsmax, quantMap, nestedAbsmax, nestedMap }) t?.MoveToOuterDisposeScope();
        return q;
    }

    /// <summary>The weight in fp32, shaped as <see cref="QuantState.shape"/>.</summary>
    public static Tensor Dequantize(Quantized4Bit q)
    {
        using var scope = NewDisposeScope();
        var s = q.State;
        long n = s.Count;
        var codes = Unpack(q.Data, n);
        var values = Codebooks.For4Bit(s.quant_type).to(q.Data.device).index_select(0, codes);
        var (blocks, _) = Blocks.Split(values, s.blocksize);
        var w = (blocks * q.AbsmaxFloat().unsqueeze(1)).reshape(-1).narrow(0, 0, n).reshape(s.shape);
        return w.MoveToOuterDisposeScope();
    }

    /// <summary>NF4 code of each scaled value: the number of pivots strictly below it.</summary>
    static Tensor Nf4Codes(Tensor scaled) =>
        bucketize(scaled, tensor(Codebooks.Nf4Pivots()).to(scaled.device), outInt32: false, right: false);

    /// <summary>FP4 code: 3-bit code of the magnitude's rank, plus 8 when negative (bnb's dQuantizeFP4).</summary>
    static Tensor Fp4Codes(Tensor scaled)
    {
        var rank = bucketize(scaled.abs(), tensor(Codebooks.Fp4MagnitudePivots()).to(scaled.device), outInt32: false, right: false);
        var code3 = tensor(Codebooks.Fp4CodeOfRank.Select(b => (long)b).ToArray()).to(scaled.device).index_select(0, rank);
        return code3 + scaled.lt(0).to(ScalarType.Int64) * 8;
    }

    /// <summary>Packs 4-bit codes (int64, any count) two per byte, the first in the high nibble; an odd count is padded with code 0.</summary>
    public static Tensor Pack(Tensor codes)
    {
        using var scope = NewDisposeScope();
        var c = codes.reshape(-1).to(ScalarType.Int64);
        if (c.numel() % 2 == 1) c = cat([c, zeros(1, ScalarType.Int64, c.device)]);
        var pairs = c.reshape(-1, 2);
        var packed = (pairs.select(1, 0) * 16 + pairs.select(1, 1)).to(ScalarType.Byte);
        return packed.MoveToOuterDisposeScope();
    }

    /// <summary>The first <paramref name="n"/> 4-bit codes (int64) of packed bytes, high nibble first.</summary>
    public static Tensor Unpack(Tensor data, long n)
    {
        using var scope = NewDisposeScope();
        var b = data.reshape(-1).to(ScalarType.Int64);
        var codes = stack([b.div(16, rounding_mode: RoundingMode.floor), b.remainder(16)], 1).reshape(-1).narrow(0, 0, n);
        return codes.MoveToOuterDisposeScope();
    }

    /// <summary>Torch's dtype name as bnb writes it into the quant state.</summary>
    public static string DtypeName(ScalarType t) => t switch
    {
        ScalarType.Float32 => "float32",
        ScalarType.BFloat16 => "bfloat16",
        ScalarType.Float16 => "float16",
        _ => throw new ArgumentException($"bitsandbytes quantizes float32, bfloat16 or float16 weights, not {t}"),
    };

    /// <summary>The TorchSharp type of a quant state dtype name.</summary>
    public static ScalarType DtypeOf(string name) => name switch
    {
        "float32" => ScalarType.Float32,
        "bfloat16" => ScalarType.BFloat16,
        "float16" => ScalarType.Float16,
        _ => throw new ArgumentException($"unknown dtype '{name}'"),
    };
}
