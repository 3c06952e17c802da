using System.CommandLine;
using LoraKit.Hub;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit download ORG/NAME[@REVISION] [--include GLOB]...</c>: fetches a model's (or an adapter's) needed files, or
/// those matching the globs, into the hub cache and prints the snapshot folder on stdout (so <c>$(lorakit download …)</c>
/// is a model directory); progress goes to stderr.
/// </summary>
public static class DownloadCommand
{
    /// <summary>The command.</summary>
    public static Command Build()
    {
        var repo = new Argument<string>("repo") { Description = "hub id ORG/NAME or ORG/NAME@REVISION (branch, tag or commit)" };
        var include = new Option<string[]>("--include") { Description = "download only files matching these globs (default: the config, tokenizer and safetensors files a model or adapter needs)", AllowMultipleArgumentsPerToken = true };
        var cmd = new Command("download", "Download a model or adapter from the Hugging Face hub into its cache (HF_HOME, HF_HUB_CACHE) and print the snapshot folder.") { repo, include };
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var id = HubRepoId.Parse(r.GetValue(repo)!);
            var globs = r.GetValue(include) ?? [];
            var files = globs.Length > 0 ? HubFileSet.Matching(globs) : HubFileSet.Auto;
            var settings = ModelArgument.Settings();
            // On a terminal a byte bar per file (Spectre.Console); redirected, the plain lines of HubProgressLines.
            var snapshot = Progress.CliProgress.Resolve(Progress.ProgressMode.Auto) == Progress.ProgressMode.Bar
                ? Progress.CliProgress.Run($"download {id.Repo}", sink => HubDownloader.Download(id, files, settings with { Progress = new FileBar(sink) }), unit: "bytes")
                : HubDownloader.Download(id, files, settings);
            Console.WriteLine(snapshot);
            return 0;
        }));
        return cmd;
    }

    /// <summary>Hub progress onto the CLI's bar: bytes of the file being fetched (notes such as "resuming" are dropped).</summary>
    sealed class FileBar(Progress.ProgressSink sink) : IProgress<HubProgress>
    {
        public void Report(HubProgress p)
        {
            if (p.Note is null) sink.Report(p.Bytes, p.Total, p.File);
        }
    }
}
