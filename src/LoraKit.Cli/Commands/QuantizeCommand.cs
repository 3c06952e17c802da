using System.CommandLine;
using LoraKit.Quantization;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit quantize --model DIR --method nf4|fp4|int8 [--double-quant on|off] [--quant-blocksize N] --output DIR</c>:
/// writes a bitsandbytes-format checkpoint (<see cref="CheckpointQuantizer"/>) that transformers + bitsandbytes and
/// LoraKit load as it is. --dtype names the compute dtype recorded in quantization_config (default: the checkpoint's).
/// </summary>
public static class QuantizeCommand
{
    public static Command Build()
    {
        var model = new Option<string>("--model") { Description = "full-precision Hugging Face model directory", Required = true };
        var method = new Option<string>("--method") { Description = "nf4, fp4 or int8", Required = true };
        var doubleQuant = new Option<string?>("--double-quant") { Description = "on or off: with nf4/fp4, quantize the absmax too (default: on)" };
        var blocksize = new Option<int?>("--quant-blocksize") { Description = "with nf4/fp4: values per absmax block (default: 64)" };
        var dtype = new Option<string?>("--dtype") { Description = "compute dtype written as bnb_4bit_compute_dtype: fp32, bf16 or fp16 (default: the checkpoint's dtype, else bf16)" };
        var output = new Option<string>("--output") { Description = "new or empty directory for the quantized checkpoint", Required = true };
        var cmd = new Command("quantize", "Quantize a checkpoint to bitsandbytes NF4, FP4 or int8 (the format transformers + bitsandbytes load), tensor by tensor.")
            { model, method, doubleQuant, blocksize, dtype, output };
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var options = QuantizeOptions.Parse(r.GetValue(method), r.GetValue(doubleQuant), r.GetValue(blocksize), "--method")!;
            var dir = ModelArgument.Resolve(r.GetValue(model)!);
            IO.ModelDirectory.Require(dir);
            string compute = r.GetValue(dtype) is string d ? ComputeName(d) : CheckpointQuantizer.DeclaredDtype(dir) ?? "bfloat16";
            options = options with { ComputeDtype = compute };
            var outDir = r.GetValue(output)!;
            int n = Progress.CliProgress.Run("quantize", sink => CheckpointQuantizer.Quantize(dir, outDir, options, sink.AsCallback()), unit: "tensors");
            Console.WriteLine($"wrote {outDir}: {n} linear weights in {Models.QuantizedBase.Describe(options)} (compute dtype {compute}); the LM head and embeddings unchanged");
            return 0;
        }));
        return cmd;
    }

    static string ComputeName(string d) => d switch
    {
        "fp32" or "float32" => "float32",
        "bf16" or "bfloat16" => "bfloat16",
        "fp16" or "float16" => "float16",
        _ => throw new LoraKitException($"--dtype must be fp32, bf16 or fp16, not '{d}'"),
    };
}
