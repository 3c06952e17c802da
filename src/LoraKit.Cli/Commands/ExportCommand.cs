using System.CommandLine;
using LoraKit.Export;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit export gguf --model DIR [--adapter DIR] --output FILE.gguf [--type f16|bf16|q8_0|f32]</c> writes a merged
/// model for llama.cpp, Ollama and LLamaSharp; with <c>--adapter-only</c> the adapter alone as a llama.cpp LoRA GGUF
/// (<see cref="GgufExport"/>). <c>export</c> is a group so other formats can sit beside gguf.
/// </summary>
public static class ExportCommand
{
    public static Command Build()
    {
        var export = new Command("export", "Export a model or adapter to another runtime's format.");
        export.Subcommands.Add(Gguf());
        return export;
    }

    static Command Gguf()
    {
        var model = new Option<string>("--model") { Description = "Hugging Face model directory (the base)", Required = true };
        var adapter = new Option<string?>("--adapter") { Description = "adapter directory or registered NAME[@VERSION|@ALIAS]: merged into the model, or exported alone with --adapter-only" };
        var registry = AdapterArgument.RegistryOption();
        var adapterOnly = new Option<bool>("--adapter-only") { Description = "write the adapter as a llama.cpp LoRA GGUF (load it over the base's GGUF)" };
        var output = new Option<string>("--output") { Description = "the .gguf file to create (never overwritten)", Required = true };
        var type = new Option<string>("--type") { Description = "matrix type: f16, bf16, q8_0 or f32; norms stay f32", DefaultValueFactory = _ => "f16" };
        var cmd = new Command("gguf", "Write a merged model, or an adapter alone, as GGUF for llama.cpp, Ollama and LLamaSharp.")
            { model, adapter, adapterOnly, output, type, registry };
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var fileType = GgufExport.ParseType(r.GetValue(type)!);
            string dir = ModelArgument.Resolve(r.GetValue(model)!), outFile = r.GetValue(output)!;
            IO.ModelDirectory.Require(dir);
            var adapterDir = r.GetValue(adapter) is string a ? AdapterArgument.Resolve(a, r.GetValue(registry)) : null;
            if (r.GetValue(adapterOnly))
            {
                var adapterPath = adapterDir ?? throw new LoraKitException("--adapter-only needs --adapter DIR");
                Progress.CliProgress.Run("export gguf", sink => GgufExport.Adapter(dir, adapterPath, outFile, fileType, sink.AsCallback()), unit: "tensors");
                Console.WriteLine($"wrote {outFile}: LoRA adapter {adapterDir} for {dir} ({fileType})");
            }
            else
            {
                Progress.CliProgress.Run("export gguf", sink => GgufExport.Model(dir, adapterDir, outFile, fileType, sink.AsCallback()), unit: "tensors");
                Console.WriteLine($"wrote {outFile}: {dir}{(adapterDir is null ? "" : " with " + adapterDir + " merged")} ({fileType})");
            }
            return 0;
        }));
        return cmd;
    }
}
