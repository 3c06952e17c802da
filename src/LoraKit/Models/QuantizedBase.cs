using LoraKit.IO;
using LoraKit.Quantization;
using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// What quantization a load gives the base: a request to quantize on load, a checkpoint that is already quantized
/// (bitsandbytes format, read from its first quantized weight), or neither. A pre-quantized checkpoint with a request
/// is accepted only when the request names the checkpoint's own method, block size and double quantization (then it is
/// a no-op: the stored codes are used as they are); any other request is refused, since re-quantizing already
/// quantized weights would silently train against a third set of weights.
/// </summary>
/// <param name="OnLoad">Options for quantizing full-precision weights while loading (null: none).</param>
/// <param name="Base">The quantization of the loaded base, with the compute dtype (null: full precision).</param>
public sealed record QuantizedBase(BnbQuantizeOptions? OnLoad, BnbQuantizeOptions? Base)
{
    /// <summary>Decides for checkpoint <paramref name="dir"/> (open as <paramref name="files"/>), computing in <paramref name="dtype"/>.</summary>
    public static QuantizedBase Resolve(string dir, CheckpointFiles files, BnbQuantizeOptions? request, ScalarType dtype)
    {
        string compute = Blockwise4Bit.DtypeName(dtype);
        request = request is null ? null : request with { ComputeDtype = compute };
        request?.Validate();
        var stored = Stored(files);
        if (stored is null) return new QuantizedBase(request, request);
        stored = stored with { ComputeDtype = compute };
        if (request is not null && !SameCodes(request, stored))
            throw new LoraKitException($"{dir} is already quantized ({Describe(stored)}); the requested {Describe(request)} does not match. " +
                "Load it without a quantization request, or quantize its full-precision original instead");
        return new QuantizedBase(null, stored);
    }

    /// <summary>The quantization a bitsandbytes checkpoint stores (from its first quantized weight), or null when it has none.</summary>
    public static BnbQuantizeOptions? Stored(CheckpointFiles files)
    {
        var first = BnbCheckpoint.QuantizedWeights(files).FirstOrDefault();
        if (first is null) return null;
        if (BnbCheckpoint.KindOf(files, first) == BnbKind.Int8) return new BnbQuantizeOptions("int8");
        using var q = BnbCheckpoint.Read4Bit(files, first);
        return new BnbQuantizeOptions(q.State.quant_type, q.State.Nested, q.State.blocksize);
    }

    /// <summary>Whether two option sets produce the same stored codes (int8 has no block size or double quantization).</summary>
    static bool SameCodes(BnbQuantizeOptions a, BnbQuantizeOptions b) =>
        a.Method == b.Method && (a.Method == "int8" || (a.Blocksize == b.Blocksize && a.DoubleQuant == b.DoubleQuant));

    /// <summary>"nf4, blocksize 64, double quantization on" or "int8".</summary>
    public static string Describe(BnbQuantizeOptions o) =>
        o.Method == "int8" ? "int8" : $"{o.Method}, blocksize {o.Blocksize}, double quantization {(o.DoubleQuant ? "on" : "off")}";
}
