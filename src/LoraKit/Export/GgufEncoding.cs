namespace LoraKit.Export;

/// <summary>
/// The bytes of a float32 row-major tensor as ggml stores each type: F32 and F16 (IEEE, round to nearest even), BF16
/// (the top half of the float32, rounded to nearest even, NaN kept quiet) and Q8_0 (per block of 32 consecutive values
/// of a row: scale d = max|x| / 127 as fp16, then 32 int8 round(x / d), as ggml's quantize_row_q8_0_ref).
/// </summary>
public static class GgufEncoding
{
    /// <summary>Q8_0's block length (ggml's QK8_0).</summary>
    public const int Q8Block = 32;

    /// <summary>Encodes <paramref name="values"/> (innermost dimension <paramref name="rowLength"/>) as <paramref name="type"/>.</summary>
    public static byte[] Encode(ReadOnlySpan<float> values, GgmlType type, long rowLength) => type switch
    {
        GgmlType.F32 => F32(values),
        GgmlType.F16 => F16(values),
        GgmlType.BF16 => BF16(values),
        GgmlType.Q8_0 => Q8_0(values, rowLength),
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "unsupported ggml type"),
    };

    /// <summary>Whether a row of <paramref name="rowLength"/> values can be stored as Q8_0 (whole blocks only).</summary>
    public static bool FitsQ8_0(long rowLength) => rowLength % Q8Block == 0;

    static byte[] F32(ReadOnlySpan<float> v)
    {
        var bytes = new byte[v.Length * 4];
        System.Runtime.InteropServices.MemoryMarshal.AsBytes(v).CopyTo(bytes);
        return bytes;
    }

    static byte[] F16(ReadOnlySpan<float> v)
    {
        var bytes = new byte[v.Length * 2];
        for (int i = 0; i < v.Length; i++) BitConverter.TryWriteBytes(bytes.AsSpan(i * 2), (Half)v[i]);
        return bytes;
    }

    static byte[] BF16(ReadOnlySpan<float> v)
    {
        var bytes = new byte[v.Length * 2];
        for (int i = 0; i < v.Length; i++) BitConverter.TryWriteBytes(bytes.AsSpan(i * 2), ToBf16(v[i]));
        return bytes;
    }

    /// <summary>float32 → bfloat16 bits, round to nearest even; a NaN stays a (quiet) NaN instead of rounding to infinity.</summary>
    public static ushort ToBf16(float f)
    {
        uint bits = BitConverter.SingleToUInt32Bits(f);
        if (float.IsNaN(f)) return (ushort)((bits >> 16) | 64);
        return (ushort)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }

    static byte[] Q8_0(ReadOnlySpan<float> v, long rowLength)
    {
        if (!FitsQ8_0(rowLength)) throw new ArgumentException($"Q8_0 needs rows of a multiple of {Q8Block} values, got {rowLength}");
        int blocks = v.Length / Q8Block;
        var bytes = new byte[blocks * (2 + Q8Block)];
        for (int b = 0; b < blocks; b++)
        {
            var x = v.Slice(b * Q8Block, Q8Block);
            float amax = 0;
            foreach (var e in x) amax = MathF.Max(amax, MathF.Abs(e));
            float d = amax / 127f, id = d != 0 ? 1f / d : 0f;
            int o = b * (2 + Q8Block);
            BitConverter.TryWriteBytes(bytes.AsSpan(o), (Half)d);
            for (int j = 0; j < Q8Block; j++)
                bytes[o + 2 + j] = unchecked((byte)(sbyte)MathF.Round(x[j] * id, MidpointRounding.AwayFromZero));
        }
        return bytes;
    }
}
