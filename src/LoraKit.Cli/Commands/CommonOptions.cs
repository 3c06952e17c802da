using System.CommandLine;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Cli.Commands;

/// <summary>Options shared by the model-using commands, and the code that turns them into a loaded model.</summary>
public sealed class CommonOptions
{
    public Option<string> Model { get; } = new("--model") { Description = "Hugging Face model directory (config.json, safetensors, tokenizer.json), or hub id ORG/NAME[@REVISION]", Required = true };
    public Option<string> Device { get; } = new("--device") { Description = "auto, cpu or cuda", DefaultValueFactory = _ => "auto" };
    public Option<string?> DType { get; } = new("--dtype") { Description = "fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)" };
    public Option<bool> Json { get; } = new("--json") { Description = "print one JSON object instead of text for people" };
    public Option<string?> Adapter { get; } = new("--adapter") { Description = "PEFT-format LoRA adapter directory to apply (or registry NAME@VERSION, or hub id ORG/NAME[@REVISION])" };
    public Option<bool> AllowBaseMismatch { get; } = NewAllowBaseMismatch();
    public Option<string?> Registry { get; } = AdapterArgument.RegistryOption();
    /// <summary>--quantize, --double-quant, --quant-blocksize.</summary>
    public QuantizeOptions Quantize { get; } = new();

    /// <summary>--allow-base-mismatch, for every command that loads adapters.</summary>
    public static Option<bool> NewAllowBaseMismatch() => new("--allow-base-mismatch")
    {
        Description = "load an adapter even though LoraKit recorded that it was trained on another base model",
    };

    public void AddTo(Command c)
    {
        c.Options.Add(Model);
        c.Options.Add(Device);
        c.Options.Add(DType);
        c.Options.Add(Json);
        c.Options.Add(Adapter);
        c.Options.Add(AllowBaseMismatch);
        c.Options.Add(Registry);
        Quantize.AddTo(c);
    }

    string? _modelDir;

    /// <summary>The local directory of --model: a hub id is downloaded (once per command) and its snapshot folder returned.</summary>
    public string ModelDir(ParseResult r) => _modelDir ??= ModelArgument.Resolve(r.GetValue(Model)!);

    /// <summary>Loads the model (and the --adapter on top of it, when given) and its tokenizer.</summary>
    public (CausalLM model, Tokenizer tokenizer) Load(ParseResult r)
    {
        var dir = ModelDir(r);
        ModelDirectory.Require(dir);
        if (Classification.TextClassifier.IsSequenceClassificationCheckpoint(dir))
            throw new ArgumentException($"{dir} is a sequence-classification checkpoint (a merged classifier), not a causal LM; use `lorakit classify --model {dir}`");
        var quantize = Quantize.Resolve(r);
        var (device, dtype) = Placement.Resolve(r.GetValue(Device)!, r.GetValue(DType));
        var tokenizer = Tokenizer.Load(dir);
        var model = CausalLM.Load(dir, dtype, device, quantize);
        if (r.GetValue(Adapter) is string adapter)
            AdapterFiles.Load(new LoraModel(model), "default", AdapterArgument.Resolve(adapter, r.GetValue(Registry)), new AdapterLoadOptions { AllowBaseMismatch = r.GetValue(AllowBaseMismatch) });
        return (model, tokenizer);
    }

    /// <summary>Whether the running command has --allow-base-mismatch (the hint must name a flag that exists).</summary>
    static bool OffersAllowBaseMismatch() =>
        Environment.GetCommandLineArgs().Skip(1).FirstOrDefault() is "score" or "generate" or "merge" or "combine" or "serve";

    /// <summary>Runs a command body, turning expected failures into one clear line on stderr and exit code 1.</summary>
    public static int Run(Func<int> body)
    {
        try { return body(); }
        catch (Exception e) when (Environment.GetEnvironmentVariable("LORAKIT_DEBUG") is null)
        {
            Console.Error.WriteLine($"error: {OneLine(e)}{(e is AdapterBaseMismatchException && OffersAllowBaseMismatch() ? " (--allow-base-mismatch loads it anyway)" : "")}");
            return 1;
        }
    }

    /// <summary>
    /// The error as one line. LoraKit's own messages already are; libtorch's carry a C++ backtrace after the first
    /// line ("Exception raised from … frame #0 …"), which is noise to a user and is cut (LORAKIT_DEBUG=1 shows it all).
    /// </summary>
    public static string OneLine(Exception e)
    {
        var first = FlagNames.Rephrase(e.Message.Split('\n', 2)[0].TrimEnd('\r'));
        return e is LoraKitException || !e.Message.TrimEnd('\n', '\r').Contains('\n')
            ? first : $"{first} (set LORAKIT_DEBUG=1 for the full message)";
    }
}
