using System.CommandLine;
using LoraKit.Cli.Commands;

namespace LoraKit.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var root = BuildRoot();
        var parsed = root.Parse(args);
        if (parsed.Action is System.CommandLine.Invocation.ParseErrorAction) return ParseError(parsed);
        return parsed.Invoke();
    }

    /// <summary>The whole command tree (also used by tests to parse command lines in-process).</summary>
    public static RootCommand BuildRoot()
    {
        var root = new RootCommand("LoraKit: LoRA fine-tuning, evaluation and serving for Hugging Face causal LMs.");
        root.Subcommands.Add(ScoreCommand.Build());
        root.Subcommands.Add(GenerateCommand.Build());
        root.Subcommands.Add(ClassifyCommand.Build());
        root.Subcommands.Add(AdapterCommands.Adapter());
        root.Subcommands.Add(AdapterCommands.Merge());
        root.Subcommands.Add(AdapterCommands.Combine());
        root.Subcommands.Add(EvalCommand.Build());
        root.Subcommands.Add(RegistryCommand.Build());
        root.Subcommands.Add(TrainCommand.Build());
        root.Subcommands.Add(RunsCommand.Build());
        root.Subcommands.Add(DemoCommand.Build());
        root.Subcommands.Add(BenchCommand.Build());
        root.Subcommands.Add(ServeCommand.Build());
        root.Subcommands.Add(BenchServeCommand.Build());
        root.Subcommands.Add(CheckKernelsCommand.Build());
        root.Subcommands.Add(QuantizeCommand.Build());
        root.Subcommands.Add(DownloadCommand.Build());
        root.Subcommands.Add(ExportCommand.Build());
        root.Subcommands.Add(HelpCommand(root));
        HelpDefaults(root);
        return root;
    }

    /// <summary>
    /// A command line that does not parse gets the same one-line <c>error: …</c> as every other bad input (System.CommandLine
    /// would print one line per problem and the whole help after them), and where to read the options.
    /// </summary>
    static int ParseError(ParseResult parsed)
    {
        Console.Error.WriteLine(ParseErrorLine(parsed));
        return 1;
    }

    /// <summary>The one line printed for a command line that does not parse.</summary>
    public static string ParseErrorLine(ParseResult parsed)
    {
        var problems = parsed.Errors.Select(e => Friendly(e.Message.ReplaceLineEndings(" ").Trim().TrimEnd('.'))).Distinct().ToList();
        // "lorakit scroe": the unknown word is the problem, not the missing command.
        if (parsed.UnmatchedTokens.Count > 0 && problems.Count > 1) problems.RemoveAll(p => p.StartsWith("Required command", StringComparison.Ordinal));
        var command = parsed.CommandResult.Command;
        var path = command is RootCommand ? "lorakit" : "lorakit " + CommandPath(parsed.CommandResult);
        var message = problems.Count == 0 ? "the command line does not parse" : string.Join("; ", problems);
        return $"error: {message} (see `{path} --help`)";
    }

    /// <summary>"Cannot parse argument 'x' for option '--top-k' as expected type 'System.Int32'" in a user's words.</summary>
    static string Friendly(string problem) => System.Text.RegularExpressions.Regex.Replace(problem,
        @"^Cannot parse argument '(.*)' for option '([^']+)' as expected type '(?:System\.Nullable`1\[)?System\.(\w+)\]?'$",
        m => $"{m.Groups[2].Value} expects {TypeWords(m.Groups[3].Value)}, got '{m.Groups[1].Value}'");

    static string TypeWords(string type) => type switch
    {
        "Int32" => $"a whole number from {int.MinValue} to {int.MaxValue}",
        "Int64" => "a whole number",
        "Double" or "Single" => "a number (e.g. 0.7, 1e-4)",
        "Boolean" => "true or false",
        _ => "a " + type.ToLowerInvariant(),
    };

    static string CommandPath(System.CommandLine.Parsing.CommandResult r) =>
        r.Parent is System.CommandLine.Parsing.CommandResult p && p.Command is not RootCommand ? CommandPath(p) + " " + r.Command.Name : r.Command.Name;

    /// <summary><c>lorakit help [command...]</c>: the same as <c>lorakit [command...] --help</c>.</summary>
    static Command HelpCommand(RootCommand root)
    {
        var names = new Argument<string[]>("command") { Description = "the command to describe (none: all commands)", Arity = ArgumentArity.ZeroOrMore };
        var help = new Command("help", "Show help for LoraKit or one of its commands.") { names };
        help.SetAction(r =>
        {
            string[] words = r.GetValue(names) ?? [];
            var asked = root.Parse(words); // "help frobnicate" is an unknown command, not the root's help
            return asked.UnmatchedTokens.Count > 0 ? ParseError(asked) : root.Parse([.. words, "--help"]).Invoke();
        });
        return help;
    }

    /// <summary>
    /// One spelling for defaults in --help: System.CommandLine prints "[default: X]" for options with a default value;
    /// options whose default depends on something else (or is "none") say it in their description, moved here to the
    /// same place and form.
    /// </summary>
    static void HelpDefaults(Command command)
    {
        foreach (var o in command.Options)
            if (o.Description is string d && System.Text.RegularExpressions.Regex.Match(d, @"\s*\(default:?\s*([^()]*(?:\([^()]*\)[^()]*)*)\)") is { Success: true } m)
                o.Description = (d.Remove(m.Index, m.Length) + $" [default: {m.Groups[1].Value.Trim()}]").Trim();
        foreach (var c in command.Subcommands) HelpDefaults(c);
    }
}
