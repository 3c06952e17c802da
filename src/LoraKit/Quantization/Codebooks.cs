using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// The code tables of bitsandbytes' storage formats, as fp32 CPU tensors (see docs/quantization-formats.md):
/// <list type="bullet">
/// <item>NF4: the 16 values of <c>get_4bit_type("nf4")</c> (normal-distribution quantiles, sorted, code = index);</item>
/// <item>FP4: <c>get_4bit_type("fp4")</c> in bit-pattern order (1 sign, 2 exponent, 1 mantissa bit), divided by 12;</item>
/// <item>the signed 8-bit dynamic map of <c>create_dynamic_map()</c>, used for the double-quantized absmax.</item>
/// </list>
/// Every call returns a new tensor (the caller disposes it). The FP4 and NF4 quantizers pick codes with the pivots of
/// bnb's CUDA kernels (<see cref="Nf4Pivots"/>, <see cref="Fp4MagnitudePivots"/>), which is what hub checkpoints hold.
/// </summary>
public static class Codebooks
{
    /// <summary>bnb's NF4 table (functional.py get_4bit_type), index = 4-bit code, as the double literals of
    /// the source: the fp32 table rounds them, the pivots are their midpoints in double (see <see cref="Nf4Pivots"/>).</summary>
    static readonly double[] Nf4Values =
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ];

    /// <summary>bnb's FP4 values before normalisation, in bit-pattern order; the table is these divided by 12 (their absmax).</summary>
    static readonly float[] Fp4Raw = [0f, 0.0625f, 8f, 12f, 4f, 6f, 2f, 3f, 0f, -0.0625f, -8f, -12f, -4f, -6f, -2f, -3f];

    /// <summary>The 16 NF4 values (fp32, CPU).</summary>
    public static Tensor Nf4() => tensor(Nf4Values.Select(v => (float)v).ToArray());

    /// <summary>The 16 FP4 values in code order (fp32, CPU): raw / 12 rounded to fp32, as bnb's <c>data.div_(data.abs().max())</c>.</summary>
    public static Tensor Fp4() => tensor(Fp4Raw.Select(v => v / 12f).ToArray());

    /// <summary>The 4-bit table for <paramref name="quantType"/> ("nf4" or "fp4").</summary>
    public static Tensor For4Bit(string quantType) => quantType switch
    {
        "nf4" => Nf4(),
        "fp4" => Fp4(),
        _ => throw new ArgumentException($"unknown 4-bit quant_type '{quantType}' (expected nf4 or fp4)"),
    };

    /// <summary>
    /// Decision pivots of bnb's <c>dQuantizeNF4</c>: the midpoints of neighbouring NF4 values (computed in double, then
    /// rounded to fp32, which gives the kernel's float literals). A value strictly above pivot i gets a code above i.
    /// </summary>
    public static float[] Nf4Pivots() =>
        Enumerable.Range(0, 15).Select(i => (float)((Nf4Values[i] + Nf4Values[i + 1]) / 2)).ToArray();

    /// <summary>
    /// Decision pivots of bnb's <c>dQuantizeFP4</c> on |x|, as the kernel writes them (not exact midpoints: 0.583333f,
    /// 0.00260417f are the kernel's literals). |x| strictly above pivot k has magnitude rank above k.
    /// </summary>
    public static float[] Fp4MagnitudePivots() => [0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f];

    /// <summary>The 3-bit FP4 code of each magnitude rank (0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 → 000, 001, 110, 111, 100, 101, 010, 011).</summary>
    public static readonly byte[] Fp4CodeOfRank = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

    static readonly double[] PowersOfTen = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];

    /// <summary>
    /// bnb's signed dynamic map (<c>create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)</c>): for each
    /// exponent i = 0..6, the midpoints of <c>linspace(0.1, 1, 2^i + 1)</c> times ±10^(i-6), plus 0 and 1, sorted — 256
    /// values from -0.99297 to 1. Built with the same tensor ops as the Python source so the fp32 values agree bit for
    /// bit (fp32 linspace and fp32 products, as torch computes them).
    /// </summary>
    public static Tensor DynamicSigned()
    {
        using var scope = NewDisposeScope();
        const int maxExponentBits = 7, nonSignBits = 7;
        var parts = new List<Tensor>();
        for (int i = 0; i < maxExponentBits; i++)
        {
            long fractionItems = (1L << (i + nonSignBits - maxExponentBits)) + 1;
            var boundaries = linspace(0.1, 1, fractionItems, ScalarType.Float32);
            var means = (boundaries[..^1] + boundaries[1..]) / 2.0;
            double scale = PowersOfTen[i]; // Python's 10 ** (i - 6), correctly rounded (Math.Pow need not be)
            parts.Add(means * scale);
            parts.Add(means * -scale);
        }
        parts.Add(zeros(1, ScalarType.Float32));
        parts.Add(ones(1, ScalarType.Float32));
        var all = cat(parts, 0);
        if (all.shape[0] != 256) throw new InvalidOperationException($"dynamic map has {all.shape[0]} values, expected 256");
        return all.sort().Values.MoveToOuterDisposeScope();
    }
}
