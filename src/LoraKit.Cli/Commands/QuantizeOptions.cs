using System.CommandLine;
using LoraKit.Quantization;

namespace LoraKit.Cli.Commands;

/// <summary>
/// --quantize nf4|fp4|int8, --double-quant on|off, --quant-blocksize N: quantize the base's linear layers as they load
/// and keep them packed (QLoRA), for every command that loads a base model. The compute dtype is --dtype's.
/// </summary>
public sealed class QuantizeOptions
{
    /// <summary>--quantize.</summary>
    public Option<string?> Method { get; } = new("--quantize") { Description = "nf4, fp4 or int8: quantize the base's linear layers on load and keep them packed (a pre-quantized bitsandbytes checkpoint needs no flag; if given, it must match)" };
    /// <summary>--double-quant.</summary>
    public Option<string?> DoubleQuant { get; } = new("--double-quant") { Description = "on or off: with --quantize nf4/fp4, quantize the absmax too (default: on)" };
    /// <summary>--quant-blocksize.</summary>
    public Option<int?> Blocksize { get; } = new("--quant-blocksize") { Description = "with --quantize nf4/fp4: values per absmax block (default: 64)" };

    /// <summary>Adds the three options to <paramref name="c"/>.</summary>
    public void AddTo(Command c)
    {
        c.Options.Add(Method);
        c.Options.Add(DoubleQuant);
        c.Options.Add(Blocksize);
    }

    /// <summary>The options asked for (null: no --quantize); a bad value or a setting without --quantize is a one-line error.</summary>
    public BnbQuantizeOptions? Resolve(ParseResult r) =>
        Parse(r.GetValue(Method), r.GetValue(DoubleQuant), r.GetValue(Blocksize));

    /// <summary>See <see cref="Resolve"/>; shared with <c>lorakit quantize</c>'s --method.</summary>
    public static BnbQuantizeOptions? Parse(string? method, string? doubleQuant, int? blocksize, string flag = "--quantize")
    {
        if (method is null)
        {
            if (doubleQuant is not null || blocksize is not null) throw new LoraKitException($"--double-quant and --quant-blocksize apply only with {flag}");
            return null;
        }
        if (method is not ("nf4" or "fp4" or "int8")) throw new LoraKitException($"{flag} must be nf4, fp4 or int8, not '{method}'");
        if (doubleQuant is not (null or "on" or "off")) throw new LoraKitException($"--double-quant must be on or off, not '{doubleQuant}'");
        if (blocksize is int b && !QuantState.ValidBlocksizes.Contains(b))
            throw new LoraKitException($"--quant-blocksize must be one of {string.Join(", ", QuantState.ValidBlocksizes)}, not {b}");
        return new BnbQuantizeOptions(method, doubleQuant != "off", blocksize ?? 64);
    }
}
