using System.Security.Cryptography;
using System.Text.Json.Nodes;
using LoraKit.Lora;
using LoraKit.Registry;
using LoraKit.Training;

namespace LoraKit.Tests.Registry;

/// <summary>
/// Issue 19, lineage: a version added with the run that trained it records the run's config, its data files' sha256 and
/// sizes (as the files' bytes hash), metrics, wall time and the parent version it started from; `train --init-adapter
/// NAME@REF --register NAME` does the same at the end of a run; `registry diff` shows what differs; combine and eval take
/// names; a run directory that is not a run, or did not write the adapter, is a one-line error that adds nothing.
/// Real SQLite in a temp folder, real tiny runs on the llama fixture.
/// </summary>
[Collection(GlobalRng.Name)]
public class LineageTests
{
    static string Hex(string path) => Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(path)));

    /// <summary>A tiny run (4 steps) with a validation file, so both data files are recorded.</summary>
    static (TrainConfig Config, TrainResult Result) Run(string output, double lr = 1e-2, string? data = null)
    {
        var c = TrainingRunTests.Small(output);
        c.Lr = lr;
        if (data is not null) c.Data = data;
        c.ValidationData = Fixtures.Path_("training", "data.jsonl");
        c.EvalEvery = 2;
        return (c, Trainer.Run(c, false, new ListLog()));
    }

    static string OneLine(string stderr)
    {
        var text = stderr.Trim();
        Assert.DoesNotContain('\n', text);
        return text;
    }

    [Fact]
    public void AddWithRunRecordsConfigDataHashesMetricsAndWhichAdapter()
    {
        var dir = Fixtures.TempDir();
        var data = Path.Combine(dir, "train.jsonl");
        File.Copy(Fixtures.Path_("training", "data.jsonl"), data);
        File.AppendAllText(data, "{\"text\": \"one more line so this file differs from the validation file\"}\n");
        var (c, r) = Run(Path.Combine(dir, "run"), data: data);
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(c.Output, "report.json")))!;
        Assert.Equal(Hex(data), (string)report["data"]!["sha256"]!);
        Assert.Equal(new FileInfo(data).Length, (long)report["data"]!["bytes"]!);
        Assert.Equal(Hex(c.ValidationData!), (string)report["validation"]!["sha256"]!);
        Assert.Null(report["init_adapter"]); // a fresh adapter has no parent

        using var store = AdapterStore.Open(Path.Combine(dir, "reg"));
        var v = store.Add("helpdesk", r.AdapterDir, runDir: c.Output);
        var l = store.LineageOf("helpdesk@1")!;
        Assert.Equal(Path.GetFullPath(c.Output), l.RunDir);
        Assert.Equal("adapter", l.AdapterInRun);
        Assert.Equal(c.Lr, (double)l.RunConfig["lr"]!);
        Assert.Equal(Hex(data), (string)l.Data["train"]!["sha256"]!);
        Assert.Equal(new FileInfo(data).Length, (long)l.Data["train"]!["bytes"]!);
        Assert.Equal(Hex(c.ValidationData!), (string)l.Data["validation"]!["sha256"]!);
        Assert.Equal(new FileInfo(c.ValidationData!).Length, (long)l.Data["validation"]!["bytes"]!);
        Assert.Equal(r.FinalLoss, (double)l.Metrics["final"]!["train_loss"]!, 12);
        Assert.Equal(r.Best!.Loss, (double)l.Metrics["best"]!["eval_loss"]!, 12);
        Assert.Equal(r.Steps, (int)l.Metrics["steps"]!);
        Assert.Equal(Math.Round(r.WallSeconds, 2), l.WallSeconds);
        Assert.Null(l.ParentRef);
        Assert.Equal(v.Version, store.Show("helpdesk").Lineage.Single().Version);

        // A checkpoint the run wrote is one of its adapters too; the lineage says which.
        var ckpt = Checkpoints.Complete(c.Output).Last();
        store.Add("from-checkpoint", ckpt, runDir: c.Output);
        Assert.Equal("checkpoints/" + Path.GetFileName(ckpt), store.LineageOf("from-checkpoint")!.AdapterInRun);

        // The same content again with another run: the version and its first lineage stay.
        var (c2, _) = Run(Path.Combine(dir, "run-again"), data: data); // same seed and data: the same adapter bytes
        Assert.Equal(AdapterDigest.Compute(r.AdapterDir), AdapterDigest.Compute(Path.Combine(c2.Output, "adapter")));
        Assert.Equal(1, store.Add("helpdesk", Path.Combine(c2.Output, "adapter"), runDir: c2.Output).Version);
        Assert.Equal(Path.GetFullPath(c.Output), store.LineageOf("helpdesk@1")!.RunDir);

        // Through the CLI: show prints the lineage (text and JSON).
        var (code, stdout, stderr) = CliTests.RunCli("registry", "show", "helpdesk", "--registry", store.Root, "--json");
        Assert.True(code == 0, stderr);
        Assert.Equal(Hex(data), (string)JsonNode.Parse(stdout)!["lineage"]!["1"]!["data"]!["train"]!["sha256"]!);
        (code, stdout, stderr) = CliTests.RunCli("registry", "show", "helpdesk", "--registry", store.Root);
        Assert.True(code == 0, stderr);
        Assert.Contains($"lineage v1: run {Path.GetFullPath(c.Output)}", stdout);
        Assert.Contains($"sha256 {Hex(data)[..12]}", stdout);
    }

    [Fact]
    public void TrainFromARegisteredNameAndRegisterRecordsTheParent()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        var a = Fixtures.Path_("adapters", "llama", "a");
        var (code, stdout, stderr) = CliTests.RunCli("registry", "add", "helpdesk", a, "--registry", reg);
        Assert.True(code == 0, stderr);
        string[] Train(string output, params string[] extra) =>
            ["train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"), "--output", output,
             "--steps", "3", "--batch-size", "2", "--device", "cpu", "--lr", "1e-2", "--no-shuffle", "--registry", reg, .. extra];

        var run = Path.Combine(dir, "run");
        (code, stdout, stderr) = CliTests.RunCli(Train(run, "--init-adapter", "helpdesk@1", "--register", "helpdesk"));
        Assert.True(code == 0, stderr);
        Assert.Contains("registered helpdesk@2", stdout);
        Assert.Contains("parent helpdesk@1", stdout);
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(run, "report.json")))!;
        Assert.Equal(AdapterDigest.Compute(a), (string)report["init_adapter"]!["sha256"]!);
        Assert.Equal("helpdesk@1", (string)report["init_adapter"]!["ref"]!);
        Assert.Equal("helpdesk@1", (string)JsonNode.Parse(File.ReadAllText(Path.Combine(run, RunDirectory.ManifestFile)))!["init_adapter"]!["ref"]!);

        using (var store = AdapterStore.Open(reg))
        {
            var v2 = store.Resolve("helpdesk@2");
            Assert.Equal(AdapterDigest.Compute(Path.Combine(run, "adapter")), v2.Sha256);
            var l = store.LineageOf("helpdesk@2")!;
            Assert.Equal("helpdesk@1", l.ParentRef);
            Assert.Equal("helpdesk@1", l.InitAdapterRef);
            Assert.Equal(AdapterDigest.Compute(a), l.InitAdapterSha256);
            Assert.Equal(1e-2, (double)l.RunConfig["lr"]!);
        }

        // A plain NAME (no production alias: the latest, v2) is recorded as the version it resolved to; a resumed run
        // (given only --resume) keeps that ref, and registering its longer result names the same parent.
        var run2 = Path.Combine(dir, "run2");
        (code, stdout, stderr) = CliTests.RunCli(Train(run2, "--init-adapter", "helpdesk"));
        Assert.True(code == 0, stderr);
        (code, stdout, stderr) = CliTests.RunCli("train", "--output", run2, "--resume", "--steps", "4", "--register", "helpdesk", "--registry", reg);
        Assert.True(code == 0, stderr);
        Assert.Contains("registered helpdesk@3", stdout);
        Assert.Equal("helpdesk@2", (string)JsonNode.Parse(File.ReadAllText(Path.Combine(run2, "report.json")))!["init_adapter"]!["ref"]!);
        using (var store = AdapterStore.Open(reg))
        {
            Assert.Equal("helpdesk@2", store.LineageOf("helpdesk@3")!.ParentRef);
            Assert.Equal(4, (int)store.LineageOf("helpdesk@3")!.Metrics["steps"]!);
        }
        // A server lists each version's parent version from the same lineage (vLLM's "parent" stays the base model).
        using var models = new LoraKit.Server.RegistryModels(RegistryReader.Open(reg), "base", null, allowBaseMismatch: false);
        var listed = models.Listing().ToDictionary(m => (string)m["id"]!);
        Assert.Null((string?)listed["helpdesk@1"]["lorakit"]!["parent_version"]);
        Assert.Equal("helpdesk@1", (string)listed["helpdesk@2"]["lorakit"]!["parent_version"]!);
        Assert.Equal("helpdesk@2", (string)listed["helpdesk@3"]["lorakit"]!["parent_version"]!);
        Assert.Equal("base", (string)listed["helpdesk@3"]["parent"]!);
    }

    [Fact]
    public void DiffShowsTheLearningRateDataAndMetricsThatDiffer()
    {
        var dir = Fixtures.TempDir();
        var data = Path.Combine(dir, "more.jsonl");
        File.Copy(Fixtures.Path_("training", "data.jsonl"), data);
        File.AppendAllText(data, "{\"text\": \"an extra line of training text\"}\n");
        var (c1, r1) = Run(Path.Combine(dir, "slow"), lr: 1e-2);
        var (c2, r2) = Run(Path.Combine(dir, "fast"), lr: 5e-2, data: data);
        using var store = AdapterStore.Open(Path.Combine(dir, "reg"));
        store.Add("helpdesk", r1.AdapterDir, runDir: c1.Output);
        store.Add("helpdesk", r2.AdapterDir, runDir: c2.Output);
        store.Add("other", Fixtures.Path_("adapters", "llama", "b"));

        var d = store.Diff("helpdesk@1", "helpdesk@2");
        DiffRow Row(string section, string key) => d.Rows.Single(x => x.Section == section && x.Key == key);
        Assert.Equal(["version", "sha256", "base", "created"], d.Rows.Where(x => x.Section == "identity").Select(x => x.Key));
        Assert.Equal(c1.Lr, double.Parse(Row("run_config", "lr").Left!, System.Globalization.CultureInfo.InvariantCulture));
        Assert.Equal(c2.Lr, double.Parse(Row("run_config", "lr").Right!, System.Globalization.CultureInfo.InvariantCulture));
        Assert.Equal((Hex(c1.Data), Hex(data)), (Row("data", "train.sha256").Left, Row("data", "train.sha256").Right));
        Assert.Equal((r1.Data.Samples.ToString(), r2.Data.Samples.ToString()), (Row("data", "train.samples").Left, Row("data", "train.samples").Right));
        Assert.NotEqual(Row("metrics", "final.train_loss").Left, Row("metrics", "final.train_loss").Right);
        Assert.DoesNotContain(d.Rows, x => x.Key is "r" or "validation.sha256" or "steps"); // equal: left out
        Assert.DoesNotContain(d.Rows, x => x.Section == "adapter_config"); // same r, alpha, targets

        var (code, stdout, stderr) = CliTests.RunCli("registry", "diff", "helpdesk@1", "helpdesk@2", "--registry", store.Root, "--json");
        Assert.True(code == 0, stderr);
        var rows = JsonNode.Parse(stdout)!["rows"]!.AsArray();
        Assert.Contains(rows, x => (string)x!["section"]! == "run_config" && (string)x["key"]! == "lr");
        (code, stdout, stderr) = CliTests.RunCli("registry", "diff", "helpdesk@1", "helpdesk@2", "--registry", store.Root);
        Assert.True(code == 0, stderr);
        Assert.Contains("train.sha256", stdout);

        // Two names: the fixture adapter has no lineage, so the run's sections show only one side.
        var across = store.Diff("helpdesk@1", "other@1");
        Assert.Contains(across.Rows, x => x.Section == "run_config" && x.Key == "lr" && x.Right is null);
        Assert.Contains(across.Rows, x => x.Section == "adapter_config");
    }

    [Fact]
    public void CombineAndEvalTakeRegisteredNames()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        var a = Fixtures.Path_("adapters", "llama", "a");
        var b = Fixtures.Path_("adapters", "llama", "b");
        Assert.Equal(0, CliTests.RunCli("registry", "add", "one", a, "--registry", reg).code);
        Assert.Equal(0, CliTests.RunCli("registry", "add", "two", b, "--registry", reg).code);
        var byDir = Path.Combine(dir, "by-dir");
        var byName = Path.Combine(dir, "by-name");
        var (code, _, stderr) = CliTests.RunCli("combine", "--model", Fixtures.Model("llama"), "--adapters", $"{a}:0.7,{b}:0.3", "--method", "cat", "--output", byDir);
        Assert.True(code == 0, stderr);
        (code, _, stderr) = CliTests.RunCli("combine", "--model", Fixtures.Model("llama"), "--adapters", "one@1:0.7,two:0.3", "--method", "cat", "--output", byName, "--registry", reg);
        Assert.True(code == 0, stderr);
        Assert.Equal(File.ReadAllBytes(Path.Combine(byDir, AdapterFiles.WeightsFile)), File.ReadAllBytes(Path.Combine(byName, AdapterFiles.WeightsFile)));

        var suite = Path.Combine(dir, "s.jsonl");
        File.WriteAllText(suite, System.Text.Json.JsonSerializer.Serialize(new { id = "t", kind = "task", prompt = "Hello", expect = new { contains = "x" }, max_tokens = 2 }) + "\n");
        var output = Path.Combine(dir, "eval");
        (code, _, stderr) = CliTests.RunCli("eval", "--model", Fixtures.Model("llama"), "--adapter", "one", "--adapter", b, "--registry", reg, "--suite", suite, "--device", "cpu", "--output", output);
        Assert.True(code == 0, stderr);
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(output, "eval.json")))!;
        Assert.Equal("lorakit.eval/1", (string)report["format"]!);
        var entry = report["adapters"]![0]!;
        Assert.Equal("one", (string)entry["registry"]!["name"]!);
        Assert.Equal(1, (int)entry["registry"]!["version"]!);
        Assert.Equal("one@1", (string)entry["registry"]!["ref"]!);
        Assert.Equal(AdapterDigest.Compute(a), (string)entry["registry"]!["sha256"]!);
        Assert.Null(report["adapters"]![1]!["registry"]); // a folder: no registry entry
        // The report still gates the registered version.
        Assert.Equal(0, CliTests.RunCli("registry", "add", "one", a, "--eval", output, "--registry", reg).code);
    }

    [Fact]
    public void BadRunsAndParentsAreOneLineErrorsThatAddNothing()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        var a = Fixtures.Path_("adapters", "llama", "a");
        var (c, r) = Run(Path.Combine(dir, "run"));

        var (code, _, stderr) = CliTests.RunCli("registry", "add", "x", a, "--run", Path.Combine(dir, "missing"), "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("no such run directory", OneLine(stderr));
        (code, _, stderr) = CliTests.RunCli("registry", "add", "x", a, "--run", a, "--registry", reg); // an adapter folder is not a run
        Assert.Equal(1, code);
        Assert.Contains("not a LoraKit run directory", OneLine(stderr));
        (code, _, stderr) = CliTests.RunCli("registry", "add", "x", a, "--run", c.Output, "--registry", reg); // the run did not write it
        Assert.Equal(1, code);
        Assert.Contains("is not an adapter the run", OneLine(stderr));
        using (var store = AdapterStore.Open(reg)) Assert.Empty(store.List());

        // An unknown parent ref stops train before it starts; nothing is trained or registered.
        var output = Path.Combine(dir, "run-nosuch");
        (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"), "--output", output,
            "--steps", "2", "--device", "cpu", "--init-adapter", "helpdesk@9", "--register", "x", "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("helpdesk@9", OneLine(stderr));
        Assert.False(File.Exists(Path.Combine(output, "report.json")));
        (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"), "--output", output,
            "--steps", "2", "--device", "cpu", "--register", "not a name", "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("is not valid", OneLine(stderr));
        using (var store = AdapterStore.Open(reg)) Assert.Empty(store.List());

        // A registry that fails after training: the adapter stays, and the error says where it is.
        var blocked = Path.Combine(dir, "a-file");
        File.WriteAllText(blocked, "");
        c.Register = "x";
        c.Registry = blocked;
        var ex = Assert.Throws<LoraKitException>(() => LoraKit.Cli.Commands.TrainRegistration.Register(c, r));
        Assert.Contains($"the adapter is in {r.AdapterDir}", ex.Message);
        Assert.True(File.Exists(Path.Combine(r.AdapterDir, AdapterFiles.WeightsFile)));
    }
}
