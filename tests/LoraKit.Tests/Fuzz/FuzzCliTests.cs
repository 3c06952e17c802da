using System.CommandLine;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// A second, adversarial pass over what a user hands the CLI (issue 16): command lines that do not parse, files that
/// are links to devices or loops or nowhere, a directory where a file belongs and the reverse, integer tensors under
/// a weight's name, outputs that are files or foreign. Each must end as one clean error line in seconds, with nothing
/// foreign touched and no debris left.
/// </summary>
public class FuzzCliTests
{
    // ---- command lines ----

    /// <summary>
    /// Every option of every command given no value, a non-number, an overflowing number; unknown options, unknown
    /// words; parsed in-process: the line printed must be one "error: …" line that names where to read the options.
    /// </summary>
    [Fact]
    public void CommandLinesThatDoNotParseAreOneErrorLine()
    {
        var root = LoraKit.Cli.Program.BuildRoot();
        List<string[]> lines = [[], ["frobnicate"], ["--frobnicate"], ["scroe"], ["adapter"], ["adapter", "frob"], ["help", "--bogus"]];
        void Walk(Command c, string[] path)
        {
            if (c.Subcommands.Count == 0 || path.Length > 0) lines.Add([.. path, "--no-such-option", "1"]);
            lines.Add([.. path, "unexpected-word"]);
            foreach (var o in c.Options)
            {
                if (o.Name is "--help" or "--version" || o.ValueType == typeof(bool)) continue;
                lines.Add([.. path, o.Name]); // no value
                if (o.ValueType != typeof(string) && o.ValueType != typeof(string[]))
                {
                    lines.Add([.. path, o.Name, "x1"]);
                    lines.Add([.. path, o.Name, "99999999999999999999999"]);
                    lines.Add([.. path, o.Name, "inf"]);
                }
            }
            foreach (var s in c.Subcommands) Walk(s, [.. path, s.Name]);
        }
        foreach (var s in root.Subcommands) Walk(s, [s.Name]);

        int errors = 0;
        foreach (var args in lines)
        {
            var parsed = root.Parse(args);
            if (parsed.Action is not System.CommandLine.Invocation.ParseErrorAction) continue;
            errors++;
            var line = LoraKit.Cli.Program.ParseErrorLine(parsed);
            string name = "lorakit " + string.Join(' ', args);
            string? verdict = line.StartsWith("error: ", StringComparison.Ordinal) && line.Contains("--help`", StringComparison.Ordinal)
                ? FuzzContract.JudgeMessage(line) : $"not an 'error: … (see `… --help`)' line: {line}";
            FuzzContract.Record("cli-parse", name, verdict is null ? "clean-error" : "unclean", verdict ?? line);
            Assert.True(verdict is null, $"{name}: {verdict}");
            if (args.Length > 0 && root.Subcommands.FirstOrDefault(c => c.Name == args[0]) is { } cmd && cmd.Subcommands.Count == 0)
                Assert.Contains($"lorakit {args[0]} --help", line);
        }
        Assert.True(errors > 100, $"only {errors} of {lines.Count} command lines failed to parse");
    }

    /// <summary>The same through real processes (System.CommandLine printed several lines and the whole help).</summary>
    [Fact]
    public void ParseErrorsThroughTheCli()
    {
        foreach (var args in new[] { new[] { "score", "--model", Fixtures.Model("llama"), "--text", "hi", "--bogus", "1" }, ["frobnicate"], ["help", "frobnicate"] })
        {
            var (code, stdout, stderr) = CliTests.RunCli(args);
            FuzzContract.CheckCli("cli-parse", string.Join(' ', args), code, stderr);
            Assert.Equal(1, code);
            Assert.Equal("", stdout); // no help dumped after the error
        }
    }

    // ---- model and adapter files that are not plain files ----

    static string LinkedModel(string except)
    {
        var dir = Fixtures.TempDir();
        foreach (var f in Directory.GetFiles(Fixtures.Model("llama")))
            if (Path.GetFileName(f) != except) File.CreateSymbolicLink(Path.Combine(dir, Path.GetFileName(f)), f);
        return dir;
    }

    static void LoadModelAndTokenizer(string dir)
    {
        using var m = CausalLM.Load(dir, ScalarType.Float32, CPU);
        Tokenizer.Load(dir);
    }

    /// <summary>Each file of a model as a dangling link, a link loop, a directory and a link to /dev/zero.</summary>
    [Fact]
    public void ModelFilesThatAreNotPlainFiles()
    {
        foreach (var file in new[] { "config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors" })
        {
            var kinds = new List<(string kind, Action<string> make, string expect)>
            {
                ("dangling link", p => File.CreateSymbolicLink(p, "/nonexistent/lorakit-fuzz"), ""),
                ("link loop", p => File.CreateSymbolicLink(p, p), "link"),
                ("directory", p => Directory.CreateDirectory(p), ""),

                // an endless file: reading it whole hung (config.json) or took 4 GB (tokenizer.json)
                ("link to /dev/zero", p => File.CreateSymbolicLink(p, "/dev/zero"), "bytes"),
            };
            foreach (var (kind, make, expect) in kinds)
            {
                var dir = LinkedModel(file);
                make(Path.Combine(dir, file));
                var e = FuzzContract.Check("cli-files", $"{file} as {kind}", () => LoadModelAndTokenizer(dir));
                if (kind == "directory" && file == "tokenizer_config.json") continue; // optional file: ignored
                Assert.NotNull(e);
                Assert.Contains(file, e!.Message);
                Assert.Contains(expect, e.Message);
            }
        }
    }

    [Fact]
    public void AdapterPathsThatAreNotAdapterDirectories()
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        var adapter = Path.Combine(Fixtures.Root, "fixtures", "adapters", "llama", "a");
        var loop = Fixtures.TempDir();
        File.CreateSymbolicLink(Path.Combine(loop, "adapter_config.json"), Path.Combine(adapter, "adapter_config.json"));
        File.CreateSymbolicLink(Path.Combine(loop, "adapter_model.safetensors"), Path.Combine(loop, "adapter_model.safetensors"));
        var dangling = Fixtures.TempDir();
        File.CreateSymbolicLink(Path.Combine(dangling, "adapter_config.json"), "/nonexistent/lorakit-fuzz");
        var zero = Fixtures.TempDir();
        File.CreateSymbolicLink(Path.Combine(zero, "adapter_config.json"), "/dev/zero");
        var cases = new (string name, string dir, string expect)[]
        {
            ("a file", Path.Combine(adapter, "adapter_config.json"), "is a file"),
            ("missing", Path.Combine(Fixtures.TempDir(), "nope"), "does not exist"),
            ("a model directory", Fixtures.Model("llama"), "holds a model"),
            ("weights a link loop", loop, "link"),
            ("config a dangling link", dangling, "does not exist"),
            ("config a link to /dev/zero", zero, "bytes"),
        };
        foreach (var (name, dir, expect) in cases)
            foreach (var (op, act) in new (string, Action)[] { ("config", () => LoraConfig.Load(dir)), ("load", () => AdapterFiles.Load(lm, "x", dir)) })
            {
                if (op == "config" && dir == loop) continue; // the config itself is fine
                var e = FuzzContract.Check("cli-files", $"adapter {name} ({op})", act);
                Assert.NotNull(e);
                Assert.Contains(expect, e!.Message);
            }
    }

    [Fact]
    public void TrainingDataThatIsNotAJsonlFile()
    {
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var cases = new (string name, string path, string expect)[]
        {
            ("a directory", Fixtures.TempDir(), "is a directory"),
            ("/dev/zero", "/dev/zero", "longer than"), // one endless line: grew to 4 GB
        };
        foreach (var (name, path, expect) in cases)
        {
            var e = FuzzContract.Check("cli-data", name, () => JsonlDataset.Load(path, tok, new DataOptions { MaxLength = 64 }));
            Assert.NotNull(e);
            Assert.Contains(expect, e!.Message);
        }
    }

    // ---- weights ----

    /// <summary>An integer or bool tensor under a model weight's name was cast to float and ran a wrong model.</summary>
    [Fact]
    public void IntegerAndBoolTensorsUnderWeightNamesAreRefused()
    {
        var src = Path.Combine(Fixtures.Model("llama"), "model.safetensors");
        foreach (var (dtype, name) in new[] { (ScalarType.Int8, "model.norm.weight"), (ScalarType.Byte, "model.embed_tokens.weight"),
                     (ScalarType.Int16, "lm_head.weight"), (ScalarType.Int32, "model.layers.0.self_attn.q_proj.weight"),
                     (ScalarType.Int64, "model.layers.1.mlp.down_proj.weight"), (ScalarType.Bool, "model.norm.weight") })
        {
            var dir = LinkedModel("model.safetensors");
            using (var file = SafetensorsFile.Open(src))
            {
                var tensors = file.Entries.Keys.ToDictionary(k => k, k => file.Read(k));
                var old = tensors[name];
                tensors[name] = old.to(dtype);
                old.Dispose();
                SafetensorsWriter.Save(Path.Combine(dir, "model.safetensors"), tensors);
                foreach (var t in tensors.Values) t.Dispose();
            }
            var e = FuzzContract.Check("cli-weights", $"{name} as {dtype}", () => { using var m = CausalLM.Load(dir, ScalarType.Float32, CPU); });
            Assert.NotNull(e);
            Assert.Contains("floating point", e!.Message);
            Assert.Contains(name, e.Message);
        }
    }

    // ---- outputs ----

    /// <summary>
    /// merge's writer given an --output that is a file, a dangling link, /dev/null, a path under a file or a foreign
    /// non-empty directory: refused before anything is written, the target untouched, no temporary directory left.
    /// </summary>
    [Fact]
    public void MergeOutputsThatCannotBeWritten()
    {
        using var model = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        var parent = Fixtures.TempDir();
        var file = Path.Combine(parent, "a-file");
        File.WriteAllText(file, "precious");
        var linkParent = Fixtures.TempDir(); // apart: Snapshot cannot read a dangling link
        var dangling = Path.Combine(linkParent, "dangling");
        File.CreateSymbolicLink(dangling, "/nonexistent/lorakit-fuzz");
        var foreign = Path.Combine(parent, "foreign");
        Directory.CreateDirectory(foreign);
        File.WriteAllText(Path.Combine(foreign, "notes.txt"), "precious");
        var before = FuzzContract.Snapshot(parent);
        var cases = new (string name, string output, string expect)[]
        {
            ("a file", file, "not a directory"),
            ("a dangling link", dangling, "not a directory"),
            ("/dev/null", "/dev/null", "not a directory"),
            ("a path under a file", Path.Combine(file, "sub", "out"), "is not a directory"),
            ("a foreign directory", foreign, "not empty"),
            ("the model directory", Fixtures.Model("llama"), "not empty"),
        };
        foreach (var (name, output, expect) in cases)
        {
            var e = FuzzContract.Check("cli-output", $"merge --output {name}", () => CheckpointWriter.Save(model, Fixtures.Model("llama"), output));
            Assert.NotNull(e);
            Assert.Contains(expect, e!.Message);
        }
        FuzzContract.AssertUntouched(before, parent, "merge outputs that cannot be written");
        Assert.Empty(Directory.GetFileSystemEntries(parent, ".*tmp*"));
        Assert.Equal([dangling], Directory.GetFileSystemEntries(linkParent));
    }

    [Fact]
    public void CombineWithAnAbsurdRankNamesTheRankBound()
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        var adapters = Path.Combine(Fixtures.Root, "fixtures", "adapters", "llama");
        AdapterFiles.Load(lm, "in0", Path.Combine(adapters, "a"));
        AdapterFiles.Load(lm, "in1", Path.Combine(adapters, "b"));
        foreach (int rank in new[] { 33, 1_000_000, int.MaxValue })
        {
            var e = FuzzContract.Check("cli-combine", $"svd rank {rank}", () => AdapterCombiner.Combine(lm, ["in0", "in1"], [1.0, 1.0], $"c{rank}", "svd", rank));
            Assert.NotNull(e);
            Assert.Contains("exceeds", e!.Message);
        }
    }

    /// <summary>
    /// A batch larger than the data was filled by cycling through it (--batch-size 100000 on 6 samples: past 25 s and
    /// 4 GB); it is now the whole data, with a warning.
    /// </summary>
    [Fact]
    public void BatchSizeLargerThanTheDataIsTheWholeData()
    {
        var output = Path.Combine(Fixtures.TempDir(), "run");
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", output, "--steps", "1", "--max-length", "32", "--batch-size", "100000", "--device", "cpu");
        FuzzContract.CheckCli("cli-train", "--batch-size 100000 on 6 samples", code, stderr);
        Assert.Equal(0, code);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"took {sw.Elapsed}");
        Assert.Contains("batch size 100000 is more than the 6 training samples; using 6", stderr);
    }

    /// <summary>score took any length (1,601 tokens on a 256-token model, a silently meaningless loss; attention memory
    /// grows with the square); it now refuses a text past the context, as generate does.</summary>
    [Fact]
    public void ScoreRefusesATextPastTheContext()
    {
        var text = string.Concat(Enumerable.Repeat("hello ", 400));
        var (code, _, stderr) = CliTests.RunCli("score", "--model", Fixtures.Model("llama"), "--text", text, "--device", "cpu");
        FuzzContract.CheckCli("cli-score", "400 words on a 256-token model", code, stderr);
        Assert.Equal(1, code);
        Assert.Contains("max_position_embeddings", stderr);
    }
}
