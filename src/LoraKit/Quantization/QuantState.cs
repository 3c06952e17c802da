using System.Globalization;
using System.Text;
using System.Text.Json;
using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>
/// The non-tensor part of a bitsandbytes 4-bit layer's quantization state, exactly as bnb's
/// <c>QuantState.as_dict(packed=True)</c> stores it: a JSON object, UTF-8, held in a uint8 tensor under the key
/// <c>P.weight.quant_state.bitsandbytes__nf4</c> (or <c>__fp4</c>). Field names are bnb's. The nested fields are all
/// present (double quantization) or all absent. <see cref="Parse"/> validates; <see cref="ToJson"/> writes the same
/// text Python's <c>json.dumps</c> does (", " and ": " separators, bnb's key order).
/// </summary>
/// <param name="quant_type">"nf4" or "fp4".</param>
/// <param name="blocksize">Values per absmax block (32 … 4096, a power of two).</param>
/// <param name="dtype">The torch dtype name of the original weight ("float32", "bfloat16", "float16"): the dequantized dtype.</param>
/// <param name="shape">The original weight's shape, e.g. [out_features, in_features].</param>
/// <param name="nested_blocksize">Block size of the double quantization of absmax (256), or null.</param>
/// <param name="nested_dtype">dtype of the absmax before double quantization ("float32"), or null.</param>
/// <param name="nested_offset">The mean of absmax, subtracted before double quantization, or null.</param>
#pragma warning disable IDE1006 // names are bnb's JSON keys
public sealed record QuantState(string quant_type, int blocksize, string dtype, long[] shape,
    int? nested_blocksize = null, string? nested_dtype = null, double? nested_offset = null)
#pragma warning restore IDE1006
{
    /// <summary>Block sizes bnb's <c>quantize_4bit</c> accepts.</summary>
    public static readonly int[] ValidBlocksizes = [32, 64, 128, 256, 512, 1024, 2048, 4096];

    /// <summary>The key suffix after <c>P.weight.</c> for this quant type.</summary>
    public string Key => KeyFor(quant_type);

    /// <summary>Whether the absmax is double-quantized.</summary>
    public bool Nested => nested_blocksize != null;

    /// <summary>Number of weight elements.</summary>
    public long Count => shape.Aggregate(1L, (a, b) => a * b);

    /// <summary>"quant_state.bitsandbytes__" + quant type.</summary>
    public static string KeyFor(string quantType) => "quant_state.bitsandbytes__" + quantType;

    /// <summary>The JSON text, formatted as Python's <c>json.dumps</c> formats bnb's dict.</summary>
    public string ToJson()
    {
        var sb = new StringBuilder();
        sb.Append("{\"quant_type\": ").Append(JsonSerializer.Serialize(quant_type));
        sb.Append(", \"blocksize\": ").Append(blocksize.ToString(CultureInfo.InvariantCulture));
        sb.Append(", \"dtype\": ").Append(JsonSerializer.Serialize(dtype));
        sb.Append(", \"shape\": [").Append(string.Join(", ", shape.Select(d => d.ToString(CultureInfo.InvariantCulture)))).Append(']');
        if (Nested)
        {
            sb.Append(", \"nested_blocksize\": ").Append(nested_blocksize!.Value.ToString(CultureInfo.InvariantCulture));
            sb.Append(", \"nested_dtype\": ").Append(JsonSerializer.Serialize(nested_dtype));
            sb.Append(", \"nested_offset\": ").Append(PythonFloat(nested_offset!.Value));
        }
        return sb.Append('}').ToString();
    }

    /// <summary>The JSON as the uint8 tensor bnb stores (one byte per element, 1-D).</summary>
    public Tensor ToTensor() => tensor(Encoding.UTF8.GetBytes(ToJson()), ScalarType.Byte);

    /// <summary>Python's repr of a float: shortest round-trip digits, "1e-05" exponents, "2.0" for integers.</summary>
    static string PythonFloat(double v)
    {
        if (double.IsNaN(v) || double.IsInfinity(v)) throw new ArgumentException("nested_offset must be finite");
        string s = v.ToString("R", CultureInfo.InvariantCulture);
        if (s.Contains('E'))
        {
            var parts = s.Split('E');
            int exp = int.Parse(parts[1], CultureInfo.InvariantCulture);
            return parts[0] + "e" + (exp < 0 ? "-" : "+") + Math.Abs(exp).ToString("00", CultureInfo.InvariantCulture);
        }
        return s.Contains('.') ? s : s + ".0";
    }

    /// <summary>
    /// Parses and validates the JSON bytes of a quant_state tensor; <paramref name="where"/> (file and tensor) starts
    /// every error message, which is one line.
    /// </summary>
    public static QuantState Parse(ReadOnlySpan<byte> json, string where)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json.ToArray()); }
        catch (JsonException e) { throw new LoraKitException($"{where}: quant_state is not valid JSON ({IO.JsonFiles.Reason(e)})"); }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new LoraKitException($"{where}: quant_state JSON is not an object");
            string quantType = String(root, "quant_type", where);
            if (quantType is not ("nf4" or "fp4")) throw new LoraKitException($"{where}: unknown quant_type '{quantType}' (expected nf4 or fp4)");
            int blocksize = Int(root, "blocksize", where);
            if (!ValidBlocksizes.Contains(blocksize))
                throw new LoraKitException($"{where}: blocksize {blocksize} is not one bitsandbytes supports ({string.Join(", ", ValidBlocksizes)})");
            string dtype = String(root, "dtype", where);
            if (dtype is not ("float32" or "bfloat16" or "float16")) throw new LoraKitException($"{where}: dtype '{dtype}' is not float32, bfloat16 or float16");
            if (!root.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array || sh.GetArrayLength() == 0)
                throw new LoraKitException($"{where}: quant_state has no shape array");
            var shape = sh.EnumerateArray().Select(d => d.ValueKind == JsonValueKind.Number && d.TryGetInt64(out long v) && v >= 0 ? v
                : throw new LoraKitException($"{where}: quant_state shape has an entry that is not a non-negative integer")).ToArray();
            try { _ = shape.Aggregate(1L, (a, b) => checked(a * b)); }
            catch (OverflowException) { throw new LoraKitException($"{where}: quant_state shape [{string.Join(", ", shape)}] overflows when multiplied out"); }
            bool hasNested = root.TryGetProperty("nested_blocksize", out _);
            if (!hasNested)
            {
                foreach (var k in new[] { "nested_dtype", "nested_offset" })
                    if (root.TryGetProperty(k, out _)) throw new LoraKitException($"{where}: quant_state has {k} but no nested_blocksize");
                return new QuantState(quantType, blocksize, dtype, shape);
            }
            int nestedBlocksize = Int(root, "nested_blocksize", where);
            if (nestedBlocksize <= 0) throw new LoraKitException($"{where}: nested_blocksize {nestedBlocksize} must be positive");
            string nestedDtype = String(root, "nested_dtype", where);
            if (nestedDtype is not ("float32" or "bfloat16" or "float16")) throw new LoraKitException($"{where}: nested_dtype '{nestedDtype}' is not a float type");
            if (!root.TryGetProperty("nested_offset", out var off) || off.ValueKind != JsonValueKind.Number || !double.IsFinite(off.GetDouble()))
                throw new LoraKitException($"{where}: quant_state has no finite nested_offset");
            return new QuantState(quantType, blocksize, dtype, shape, nestedBlocksize, nestedDtype, off.GetDouble());
        }
    }

    static string String(JsonElement root, string key, string where) =>
        root.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString()!
            : throw new LoraKitException($"{where}: quant_state has no string '{key}'");

    static int Int(JsonElement root, string key, string where) =>
        root.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out int i) ? i
            : throw new LoraKitException($"{where}: quant_state has no integer '{key}'");

    /// <summary>Value equality including the shape array (records compare arrays by reference).</summary>
    public bool SameAs(QuantState o) =>
        quant_type == o.quant_type && blocksize == o.blocksize && dtype == o.dtype && shape.SequenceEqual(o.shape) &&
        nested_blocksize == o.nested_blocksize && nested_dtype == o.nested_dtype && nested_offset == o.nested_offset;
}
