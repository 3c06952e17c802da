using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// bnb's 8-bit blockwise quantization with a 256-entry code (<c>quantize_blockwise</c> / <c>dequantize_blockwise</c>),
/// used by double quantization to store the 4-bit absmax vector. The input is flattened and cut into blocks of
/// <c>blocksize</c> (the last one may be partial); each block is scaled by the reciprocal of its absmax and each value
/// gets the index of the nearest code value. Ties go to the even index, as bnb's CUDA binary search
/// (<c>dQuantize&lt;0&gt;</c>) resolves them; bnb's pure-torch CPU fallback sends ties to the lower index instead — the
/// two agree except on exact midpoints. Pure tensor ops, fp32, CPU or any device.
/// </summary>
public static class DynamicBlockwise
{
    /// <summary>Codes (uint8, the input's element count) and per-block absmax (fp32) of <paramref name="x"/>.</summary>
    public static (Tensor codes, Tensor absmax) Quantize(Tensor x, Tensor code, int blocksize)
    {
        if (blocksize <= 0) throw new ArgumentException($"blocksize must be positive, got {blocksize}");
        using var scope = NewDisposeScope();
        var (blocks, n) = Blocks.Split(x, blocksize);
        var absmax = blocks.abs().amax([1]);
        var scaled = Blocks.Scale(blocks, absmax).reshape(-1);
        var map = code.to(ScalarType.Float32, x.device);
        var mids = (map[..^1] + map[1..]) * 0.5;
        var lo = bucketize(scaled, mids, outInt32: false, right: false); // ties → lower index
        var hi = bucketize(scaled, mids, outInt32: false, right: true);  // ties → upper index
        var even = where(lo.remainder(2).eq(0), lo, hi);
        var idx = where(lo.eq(hi), lo, even);
        var codes = idx.narrow(0, 0, n).to(ScalarType.Byte);
        return (codes.MoveToOuterDisposeScope(), absmax.MoveToOuterDisposeScope());
    }

    /// <summary>fp32 values <c>code[q] × absmax[block]</c> of <paramref name="codes"/> (flat, block by block).</summary>
    public static Tensor Dequantize(Tensor codes, Tensor absmax, Tensor code, int blocksize)
    {
        using var scope = NewDisposeScope();
        long n = codes.numel();
        var values = code.to(ScalarType.Float32, codes.device).index_select(0, codes.reshape(-1).to(ScalarType.Int64));
        var (blocks, _) = Blocks.Split(values, blocksize);
        var outp = (blocks * absmax.to(ScalarType.Float32).unsqueeze(1)).reshape(-1).narrow(0, 0, n);
        return outp.MoveToOuterDisposeScope();
    }
}

/// <summary>Splitting a flat tensor into equal blocks (zero-padded at the end) and scaling blocks by their absmax.</summary>
internal static class Blocks
{
    /// <summary>[blocks, blocksize] fp32 view of the flattened input, zero-padded; and the true element count.</summary>
    public static (Tensor blocks, long n) Split(Tensor x, int blocksize)
    {
        var flat = x.reshape(-1).to(ScalarType.Float32);
        long n = flat.numel();
        long nb = (n + blocksize - 1) / blocksize;
        long pad = nb * blocksize - n;
        if (pad > 0) flat = nn.functional.pad(flat, [0, pad]);
        return (flat.reshape(nb, blocksize), n);
    }

    /// <summary>
    /// Each block times the fp32 reciprocal of its absmax (as bnb's kernels: <c>x * (1/absmax)</c>, not x / absmax), clamped
    /// to [-1, 1]. An all-zero block is scaled by 1/1e-38 (bnb's CPU path), so its values stay 0 and get the code of 0.
    /// </summary>
    public static Tensor Scale(Tensor blocks, Tensor absmax) =>
        (blocks * absmax.clamp_min(1e-38).reciprocal().unsqueeze(1)).clamp(-1, 1);
}
