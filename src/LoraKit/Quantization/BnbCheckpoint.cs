using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Quantization;

/// <summary>How a weight is stored in a checkpoint.</summary>
public enum BnbKind
{
    /// <summary>Not quantized (an ordinary float tensor).</summary>
    None,
    /// <summary>bnb 4-bit (NF4 or FP4): has a <c>.quant_state.bitsandbytes__*</c> key.</summary>
    FourBit,
    /// <summary>bnb LLM.int8 storage: has a sibling <c>SCB</c> key.</summary>
    Int8,
}

/// <summary>
/// Reads the quantized weights of a bitsandbytes-format checkpoint (as transformers' <c>save_pretrained</c> writes it).
/// A weight <c>P.weight</c> is 4-bit when <c>P.weight.quant_state.bitsandbytes__nf4|fp4</c> exists — decided by that key,
/// never by the storage dtype, since FSDP-style checkpoints (bnb_4bit_quant_storage) keep the packed bytes as bf16 or
/// another dtype — and LLM.int8 when <c>P.SCB</c> exists. Every inconsistency (missing absmax, a state that does not
/// match the tensors, truncated data, unknown quant_type) is a one-line <see cref="SafetensorsException"/> naming the
/// file and the tensor. Reads on the CPU.
/// </summary>
public static class BnbCheckpoint
{
    static readonly string[] StateSuffixes = [".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"];

    /// <summary>How <paramref name="weightName"/> (e.g. <c>model.layers.0.self_attn.q_proj.weight</c>) is stored.</summary>
    public static BnbKind KindOf(CheckpointFiles files, string weightName)
    {
        if (StateSuffixes.Any(s => files.Contains(weightName + s))) return BnbKind.FourBit;
        if (weightName.EndsWith(".weight", StringComparison.Ordinal) && files.Contains(ScbName(weightName))) return BnbKind.Int8;
        return BnbKind.None;
    }

    /// <summary>The quantized weights of the checkpoint, sorted.</summary>
    public static IReadOnlyList<string> QuantizedWeights(CheckpointFiles files) =>
        files.Names.Select(n => StateSuffixes.FirstOrDefault(s => n.EndsWith(s, StringComparison.Ordinal)) is { } s ? n[..^s.Length]
                : n.EndsWith(".SCB", StringComparison.Ordinal) ? n[..^".SCB".Length] + ".weight" : null)
            .OfType<string>().Distinct().OrderBy(n => n, StringComparer.Ordinal).ToList();

    /// <summary>The keys besides <paramref name="weightName"/> that store its quantization (absmax, quant_map, SCB, …) and exist.</summary>
    public static IEnumerable<string> CompanionNames(CheckpointFiles files, string weightName)
    {
        var prefix = weightName[..^"weight".Length];
        string[] names = [.. StateSuffixes.Select(s => weightName + s), weightName + ".absmax", weightName + ".quant_map",
            weightName + ".nested_absmax", weightName + ".nested_quant_map", prefix + "SCB", prefix + "weight_format"];
        return names.Where(files.Contains);
    }

    /// <summary>The weight dequantized to fp32 in its original shape.</summary>
    public static Tensor Dequantize(CheckpointFiles files, string weightName)
    {
        switch (KindOf(files, weightName))
        {
            case BnbKind.FourBit:
                using (var q = Read4Bit(files, weightName)) return Blockwise4Bit.Dequantize(q);
            case BnbKind.Int8:
                using (var q = ReadInt8(files, weightName)) return Int8RowWise.Dequantize(q);
            default:
                throw new ArgumentException($"'{weightName}' is not a bitsandbytes-quantized weight");
        }
    }

    /// <summary>The packed data and quant state of a 4-bit weight, validated against each other.</summary>
    public static Quantized4Bit Read4Bit(CheckpointFiles files, string weightName)
    {
        var stateKeys = StateSuffixes.Select(s => weightName + s).Where(files.Contains).ToList();
        if (stateKeys.Count != 1)
            throw new LoraKitException(stateKeys.Count == 0 ? $"'{weightName}' has no quant_state key" : $"{files.PathOf(stateKeys[1])}: tensor '{weightName}' has both an nf4 and an fp4 quant_state");
        string stateKey = stateKeys[0], path = files.PathOf(stateKey);
        QuantState state;
        using (var raw = files.ReadStored(stateKey)) state = QuantState.Parse(raw.bytes, $"{path}: tensor '{stateKey}'");
        if (!stateKey.EndsWith("__" + state.quant_type, StringComparison.Ordinal))
            throw Problem(files, stateKey, $"says quant_type '{state.quant_type}' but its key names another type");

        var all = new List<Tensor>();
        try
        {
            Tensor Take(Tensor t) { all.Add(t); return t; }
            long n = state.Count, blocks = (n + state.blocksize - 1) / state.blocksize;
            var data = Take(Bytes(Take(Require(files, weightName, weightName))));
            if (data.numel() != (n + 1) / 2)
                throw Problem(files, weightName, $"holds {data.numel()} bytes but its quant_state shape [{string.Join(", ", state.shape)}] needs {(n + 1) / 2} (truncated or mismatched data)");
            var absmax = Take(Require(files, weightName + ".absmax", weightName)).reshape(-1);
            var quantMap = Take(Require(files, weightName + ".quant_map", weightName).to(ScalarType.Float32)).reshape(-1);
            ExpectCount(files, weightName + ".quant_map", quantMap, 16, "4-bit table entries");
            ExpectCount(files, weightName + ".absmax", absmax, blocks, $"blocks ({n} values in blocks of {state.blocksize})");
            Tensor? nestedAbsmax = null, nestedMap = null;
            if (state.Nested)
            {
                if (absmax.dtype != ScalarType.Byte) throw Problem(files, weightName + ".absmax", $"is {absmax.dtype} but a double-quantized absmax must be uint8 codes");
                nestedAbsmax = Take(Require(files, weightName + ".nested_absmax", weightName).to(ScalarType.Float32)).reshape(-1);
                nestedMap = Take(Require(files, weightName + ".nested_quant_map", weightName).to(ScalarType.Float32)).reshape(-1);
                long nb = state.nested_blocksize!.Value;
                ExpectCount(files, weightName + ".nested_absmax", nestedAbsmax, (blocks + nb - 1) / nb, $"nested blocks ({blocks} absmax values in blocks of {nb})");
                ExpectCount(files, weightName + ".nested_quant_map", nestedMap, 256, "dynamic map entries");
            }
            else
            {
                if (!absmax.is_floating_point()) throw Problem(files, weightName + ".absmax", $"is {absmax.dtype} but the quant_state has no nested fields (absmax must be float)");
                absmax = Take(absmax.to(ScalarType.Float32));
                foreach (var k in new[] { ".nested_absmax", ".nested_quant_map" })
                    if (files.Contains(weightName + k)) throw Problem(files, weightName + k, "exists but the quant_state has no nested fields");
            }
            var result = new Quantized4Bit(data, absmax, quantMap, nestedAbsmax, nestedMap, state);
            foreach (var t in all) if (!ReferenceEquals(t, data) && !ReferenceEquals(t, absmax) && !ReferenceEquals(t, quantMap) && !ReferenceEquals(t, nestedAbsmax) && !ReferenceEquals(t, nestedMap)) t.Dispose();
            return result;
        }
        catch { foreach (var t in all) t.Dispose(); throw; }
    }

    /// <summary>The int8 weight and its SCB row scales, validated (int8 [out, in], SCB [out], weight_format row).</summary>
    public static Int8Weight ReadInt8(CheckpointFiles files, string weightName)
    {
        string scbName = ScbName(weightName);
        var e = files.Entry(weightName);
        if (e.DType != "I8") throw Problem(files, weightName, $"has dtype {e.DType} but an LLM.int8 weight (it has an SCB) must be I8");
        if (e.Shape.Length != 2) throw Problem(files, weightName, $"has shape [{string.Join(", ", e.Shape)}]; an LLM.int8 weight is 2-D");
        var s = files.Entry(scbName);
        if (s.Shape.Aggregate(1L, (a, b) => a * b) != e.Shape[0])
            throw Problem(files, scbName, $"has {s.Shape.Aggregate(1L, (a, b) => a * b)} row scales but '{weightName}' has {e.Shape[0]} rows");
        var formatName = weightName[..^"weight".Length] + "weight_format";
        if (files.Contains(formatName))
        {
            using var f = files.ReadStored(formatName);
            if (f.numel() != 1 || f.to(ScalarType.Int64).item<long>() != 0)
                throw Problem(files, formatName, "is not 0 (row-major); only bitsandbytes' row format is supported");
        }
        var w = files.ReadStored(weightName);
        using var scbRaw = files.ReadStored(scbName);
        if (!scbRaw.is_floating_point()) { w.Dispose(); throw Problem(files, scbName, $"has dtype {s.DType}; SCB must be float"); }
        return new Int8Weight(w, scbRaw.to(ScalarType.Float32).reshape(-1));
    }

    static string ScbName(string weightName) => weightName[..^"weight".Length] + "SCB";

    static Tensor Require(CheckpointFiles files, string name, string weightName) =>
        files.Contains(name) ? files.ReadStored(name)
            : throw new LoraKitException($"{files.PathOf(weightName)}: tensor '{weightName}' is 4-bit quantized but the checkpoint has no '{name}'");

    static void ExpectCount(CheckpointFiles files, string name, Tensor t, long expected, string what)
    {
        if (t.numel() != expected) throw Problem(files, name, $"has {t.numel()} values but {expected} {what} are needed");
    }

    static LoraKitException Problem(CheckpointFiles files, string name, string problem) =>
        new SafetensorsException(files.PathOf(name), $"tensor '{name}' {problem}");

    /// <summary>The raw bytes of a tensor as a flat uint8 tensor (packed 4-bit data may be stored under any dtype).</summary>
    static Tensor Bytes(Tensor t) => t.dtype == ScalarType.Byte ? t.reshape(-1) : tensor(t.bytes.ToArray(), ScalarType.Byte);
}
