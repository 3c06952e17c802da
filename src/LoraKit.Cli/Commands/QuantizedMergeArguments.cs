using LoraKit.Lora;
using LoraKit.Quantization;
using static TorchSharp.torch;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit merge</c>'s quantization flags (<c>--merge-base dequantized|original [DIR]</c>, <c>--quantize-output</c>)
/// parsed into the library's terms, and the printed report of a quantized merge: what it was trained on, which base was
/// merged into, and the measured logit differences. The decisions themselves are <see cref="MergeBasePlan"/>'s.
/// </summary>
public static class QuantizedMergeArguments
{
    /// <summary>The requested merge base and DIR (null, null when the flag is absent).</summary>
    public static (MergeBase? requested, string? originalDir) MergeBase(string[]? values)
    {
        if (values is null || values.Length == 0) return (null, null);
        var choice = values[0] switch
        {
            "dequantized" => Lora.MergeBase.Dequantized,
            "original" => Lora.MergeBase.Original,
            _ => throw new LoraKitException($"--merge-base must be dequantized or original [DIR], not '{values[0]}'"),
        };
        return (choice, values.Length > 1 ? values[1] : null);
    }

    /// <summary>
    /// The re-quantization asked for: the method given, with the block size and double quantization the adapter was
    /// trained against when it is the same method (else bitsandbytes' defaults, 64 and on), compute dtype the output's.
    /// </summary>
    public static BnbQuantizeOptions? QuantizeOutput(string? method, BnbQuantizeOptions? trainedOn, ScalarType outputDType)
    {
        if (method is null) return null;
        if (method is not ("nf4" or "fp4" or "int8")) throw new LoraKitException($"--quantize-output must be nf4, fp4 or int8, not '{method}'");
        string compute = Blockwise4Bit.DtypeName(outputDType);
        return trainedOn is not null && trainedOn.Method == method
            ? trainedOn with { ComputeDtype = compute }
            : new BnbQuantizeOptions(method, ComputeDtype: compute);
    }

    /// <summary>Prints what was merged where and what the choices cost on the probe text.</summary>
    public static void Print(QuantizedMergeResult r, string outDir, BnbQuantizeOptions? requantized)
    {
        var p = r.Plan;
        Console.WriteLine($"merged {p.AdapterDir} into {p.ModelDir} → {outDir}{(requantized is null ? "" : $" (re-quantized: {MergeBasePlan.Describe(requantized)})")}");
        if (!p.Quantized)
        {
            Console.WriteLine($"  merge base:  {p.ModelDir} as it is (no quantization involved before re-quantizing)");
            Console.WriteLine($"  adapter's own effect:   {r.AdapterEffect}");
            if (r.Requantization is { } rq) Console.WriteLine($"  re-quantized vs merged: {rq}");
            return;
        }
        Console.WriteLine(p.TrainedOn is null
            ? $"  trained on:  not recorded (the adapter has no {BnbQuantizeOptions.AdapterMetadataKey} record)"
            : $"  trained on:  {MergeBasePlan.Describe(p.TrainedOn)} weights ({p.TrainedOnSource})");
        Console.WriteLine(p.Base == Lora.MergeBase.Dequantized
            ? $"  merge base:  the dequantized base{(p.Chosen ? "" : " (default: the weights the adapter was trained against)")}"
            : $"  merge base:  the full-precision original {p.OriginalDir}");
        if (p.OriginalDir is not null && p.OriginalDir != p.ModelDir) Console.WriteLine($"  original:    {p.OriginalCheck}");
        Console.WriteLine($"  probe:       {r.ProbeTokens} tokens, fp32 logits");
        Console.WriteLine(r.BaseChoice is { } c
            ? $"  original vs dequantized merge base: {c}"
            : "  original vs dequantized merge base: not measured (the full-precision weights are not here: --merge-base dequantized DIR measures it)");
        Console.WriteLine($"  adapter's own effect:               {r.AdapterEffect}");
        if (r.Requantization is { } q) Console.WriteLine($"  re-quantized vs merged:             {q}");
    }
}
