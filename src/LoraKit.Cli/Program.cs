using System.CommandLine;
using LoraKit.Cli.Commands;

namespace LoraKit.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var root = new RootCommand("LoraKit: LoRA fine-tuning, evaluation and serving for Hugging Face causal LMs.");
        root.Subcommands.Add(ScoreCommand.Build());
        root.Subcommands.Add(GenerateCommand.Build());
        root.Subcommands.Add(ClassifyCommand.Build());
        root.Subcommands.Add(AdapterCommands.Adapter());
        root.Subcommands.Add(AdapterCommands.Merge());
        root.Subcommands.Add(AdapterCommands.Combine());
        root.Subcommands.Add(TrainCommand.Build());
        root.Subcommands.Add(DemoCommand.Build());
        root.Subcommands.Add(BenchCommand.Build());
        root.Subcommands.Add(ServeCommand.Build());
        root.Subcommands.Add(BenchServeCommand.Build());
        root.Subcommands.Add(CheckKernelsCommand.Build());
        return root.Parse(args).Invoke();
    }
}
