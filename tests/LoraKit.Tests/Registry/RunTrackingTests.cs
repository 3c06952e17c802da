using System.Globalization;
using System.Text.Json.Nodes;
using LoraKit.Models;
using LoraKit.Registry;
using LoraKit.Training;

namespace LoraKit.Tests.Registry;

/// <summary>
/// Issue 19, experiment tracking: every `train` run is a row in the registry's <c>runs</c> table (started as running,
/// completed from its run directory), report.json carries start/end, device, tokens, tokens/s, peak memory and cost;
/// <c>runs list</c>, <c>runs show ID</c> and <c>runs compare ID ID</c> read them; a registry that cannot be written
/// never fails a run. Real tiny runs on the llama fixture, each registry a temporary folder.
/// </summary>
[Collection(GlobalRng.Name)]
public class RunTrackingTests
{
    static string Reg() => Path.Combine(Fixtures.TempDir(), "registry");

    static TrainConfig Small(string name)
    {
        var c = TrainingRunTests.Small(Path.Combine(Fixtures.TempDir(), name));
        c.ValidationFraction = 0.34; c.EvalEvery = 2;
        return c;
    }

    static TrainResult Train(TrainConfig c, string registry, List<string>? warnings = null, bool resume = false, bool overwrite = false, CancellationToken cancel = default) =>
        Trainer.Run(c, resume, new ListLog(), overwrite, cancel, tracker: new RunTracker(registry, (warnings ?? []).Add));

    static JsonObject Report(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "report.json")))!.AsObject();

    static DateTimeOffset Time(JsonNode? n) => DateTimeOffset.Parse((string)n!, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal);

    [Fact]
    public void TrainFromTheCliRecordsTheRunAndItsReportCarriesDeviceTokensMemoryAndCost()
    {
        var reg = Reg();
        var output = Path.Combine(Fixtures.TempDir(), "tracked");
        var (code, stdout, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", output, "--steps", "4", "--r", "4", "--lr", "0.01", "--batch-size", "2", "--device", "cpu", "--validation-fraction", "0.34",
            "--eval-every", "2", "--gpu-hour-cost", "2.5", "--registry", reg);
        Assert.True(code == 0, stderr);
        Assert.DoesNotContain("warning: the run is not recorded", stderr);

        // report.json: the new fields, consistent with the metrics log.
        var report = Report(output);
        var steps = File.ReadLines(Path.Combine(output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject()).Where(o => o.ContainsKey("loss")).ToList();
        var started = Time(report["started"]);
        var ended = Time(report["ended"]);
        Assert.EndsWith("Z", (string)report["started"]!);
        Assert.InRange((ended - started).TotalSeconds, (double)report["wall_seconds"]! - 0.5, (double)report["wall_seconds"]! + 0.5);
        Assert.Equal("cpu", (string)report["device"]!);
        Assert.Null(report["device_name"]);
        Assert.Equal("fp32", (string)report["dtype"]!);
        Assert.Equal((long)steps[^1]["tokens"]!, (long)report["tokens"]!);
        Assert.True((double)report["tokens_per_s"]! > 0);
        Assert.Equal("process_peak_working_set", (string)report["peak_memory_kind"]!);
        Assert.InRange((double)report["peak_memory_gib"]!, 0.01, 1024);
        Assert.Equal(2.5, (double)report["gpu_hour_cost"]!);
        Assert.Equal((double)report["wall_seconds"]! / 3600 * 2.5, (double)report["cost"]!, 5);
        Assert.Contains("cost", File.ReadAllText(Path.Combine(output, "report.html")));

        // The registry's row.
        using (var log = RunLog.Open(reg))
        {
            var run = Assert.Single(log.List());
            Assert.Contains($"run {run.Id} recorded in the registry", stdout);
            Assert.Equal(RunEnd.Finished, run.Status);
            Assert.Equal(Path.GetFullPath(output), run.OutputDir);
            Assert.Equal("tracked", run.Name);
            Assert.Equal(0.01, (double)JsonNode.Parse(run.Config)!["lr"]!);
            Assert.Equal(Fixtures.Model("llama"), run.BaseModel);
            Assert.Equal(BaseFingerprint.Of(Fixtures.Model("llama")), run.BaseFingerprint);
            Assert.Equal((string)report["started"]!, run.Started);
            Assert.True(Time(JsonValue.Create(run.Ended)) >= ended);
            Assert.Equal("cpu, fp32", run.Device);
            Assert.Equal(4, run.Steps);
            Assert.Equal((long)report["tokens"]!, run.Tokens);
            Assert.Equal((double)report["tokens_per_s"]!, run.TokensPerSecond);
            Assert.Equal((double)report["peak_memory_gib"]!, run.PeakMemoryGib);
            Assert.Equal((double)report["final_train_loss"]!, run.Final!["train_loss"], 12);
            Assert.Equal((double)report["best_eval"]!["eval_loss"]!, run.Best!["eval_loss"], 12);
            Assert.Equal((int)report["best_eval"]!["step"]!, run.BestStep);
            Assert.Equal((string)report["data"]!["path"]!, (string)run.Data!["data"]!["path"]!);
            Assert.Equal((double)report["wall_seconds"]!, run.WallSeconds); // one process: the report's wall time
            Assert.Equal((double)report["cost"]!, run.Cost);
            Assert.Null(run.Error);
        }

        // runs list / show by id and by name.
        (code, stdout, stderr) = CliTests.RunCli("runs", "list", "--registry", reg, "--json");
        Assert.True(code == 0, stderr);
        var listed = Assert.Single(JsonNode.Parse(stdout)!["runs"]!.AsArray())!;
        Assert.Equal("finished", (string)listed["status"]!);
        Assert.Equal(4, (int)listed["steps"]!);
        Assert.Equal((double)report["cost"]!, (double)listed["cost"]!);
        long id = (long)listed["id"]!;
        (code, stdout, stderr) = CliTests.RunCli("runs", "list", "--registry", reg);
        Assert.True(code == 0, stderr);
        var row = stdout.Split('\n')[1];
        Assert.StartsWith($"{id} ", row);
        Assert.Contains("tracked", row);
        Assert.Contains("finished", row);
        foreach (var reference in new[] { id.ToString(CultureInfo.InvariantCulture), "tracked" })
        {
            (code, stdout, stderr) = CliTests.RunCli("runs", "show", reference, "--registry", reg, "--json");
            Assert.True(code == 0, stderr);
            var shown = JsonNode.Parse(stdout)!;
            Assert.Equal(id, (long)shown["run_id"]!);
            Assert.Equal("finished", (string)shown["status"]!);
            Assert.Equal(Path.GetFullPath(output), (string)shown["directory"]!);
            Assert.Equal((double)report["cost"]!, (double)shown["cost"]!);
            Assert.Equal("cpu", (string)shown["device"]!);
        }
        (code, stdout, stderr) = CliTests.RunCli("runs", "show", "no-such-run", "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("no run with that id or name", stderr);
        Assert.Single(stderr.Trim().Split('\n'));
    }

    [Fact]
    public void AResumedRunUpdatesItsRowAndOverwriteReplacesIt()
    {
        var reg = Reg();
        var c = Small("resumed");
        c.Steps = 2;
        Train(c, reg);
        long first;
        using (var log = RunLog.Open(reg)) { var r = Assert.Single(log.List()); first = r.Id; Assert.Equal(2, r.Steps); Assert.Equal(0, r.Resumes); }
        c.Steps = 4;
        var resumed = Train(c, reg, resume: true);
        Assert.Equal(4, resumed.Steps);
        using (var log = RunLog.Open(reg))
        {
            var r = Assert.Single(log.List()); // the same row, not a second one
            Assert.Equal(first, r.Id);
            Assert.Equal(1, r.Resumes);
            Assert.Equal(4, r.Steps);
            Assert.Equal(RunEnd.Finished, r.Status);
            Assert.Equal((long)Report(c.Output)["tokens"]!, r.Tokens);
        }
        c.Steps = 2;
        Train(c, reg, overwrite: true);
        using (var log = RunLog.Open(reg))
        {
            var r = Assert.Single(log.List()); // the directory holds another run now: its row replaces the old one
            Assert.NotEqual(first, r.Id);
            Assert.Equal(0, r.Resumes);
            Assert.Equal(2, r.Steps);
        }
    }

    [Fact]
    public void FailedInterruptedAndKilledRunsKeepTheirStatus()
    {
        var reg = Reg();
        var bad = Small("failed");
        var data = Path.Combine(Fixtures.TempDir(), "data.jsonl");
        File.WriteAllText(data, "{\"text\": \"hello\"}\nnot json\n");
        bad.Data = data;
        Assert.ThrowsAny<LoraKitException>(() => Train(bad, reg));

        var stop = Small("stopped");
        using var cancelled = new CancellationTokenSource();
        cancelled.Cancel(); // ends the run after its first step, with a checkpoint
        Assert.Throws<TrainingInterruptedException>(() => Train(stop, reg, cancel: cancelled.Token));

        using var log = RunLog.Open(reg);
        var failed = log.Resolve("failed");
        Assert.Equal(RunEnd.Failed, failed.Status);
        Assert.Contains("data.jsonl", failed.Error);
        Assert.NotNull(failed.Ended);
        var interrupted = log.Resolve("stopped");
        Assert.Equal(RunEnd.Interrupted, interrupted.Status);
        Assert.Equal(1, interrupted.Steps);

        // A killed process never reports its end: the row stays running, and `runs list` says so.
        var killed = log.Start(new RunStart(Path.Combine(Fixtures.TempDir(), "killed"), "killed", new JsonObject { ["lr"] = 1 }, "m", null, DateTimeOffset.UtcNow, "cpu, fp32", false));
        Assert.Equal(RunEnd.Running, log.Get(killed)!.Status);
        Assert.Equal([killed, interrupted.Id, failed.Id], log.List().Select(r => r.Id));
        Assert.Equal([killed], log.List(limit: 1).Select(r => r.Id));
        var (code, stdout, stderr) = CliTests.RunCli("runs", "list", "--registry", reg);
        Assert.True(code == 0, stderr);
        Assert.Contains("running", Assert.Single(stdout.Split('\n'), l => l.StartsWith($"{killed} ")));
    }

    [Fact]
    public void CompareTakesRunIdsFromTheRegistry()
    {
        var reg = Reg();
        var a = Small("cmp-a");
        var b = Small("cmp-b");
        b.Lr = 5e-2;
        Train(a, reg);
        Train(b, reg);
        long idA, idB;
        using (var log = RunLog.Open(reg)) { idA = log.Resolve("cmp-a").Id; idB = log.Resolve("cmp-b").Id; }
        var (code, stdout, stderr) = CliTests.RunCli("runs", "compare", idA.ToString(CultureInfo.InvariantCulture), "cmp-b", "--registry", reg, "--json");
        Assert.True(code == 0, stderr);
        var o = JsonNode.Parse(stdout)!;
        Assert.Equal([a.Lr, b.Lr], o["config_differences"]!["lr"]!.AsArray().Select(v => (double)v!));
        Assert.Equal([Path.GetFullPath(a.Output), Path.GetFullPath(b.Output)], o["runs"]!.AsArray().Select(r => (string)r!["directory"]!));
        // A directory still works beside an id, and an unknown id is one clear line.
        (code, _, stderr) = CliTests.RunCli("runs", "compare", a.Output, idB.ToString(CultureInfo.InvariantCulture), "--registry", reg);
        Assert.True(code == 0, stderr);
        (code, _, stderr) = CliTests.RunCli("runs", "compare", a.Output, "987654", "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("987654", stderr);
    }

    [Fact]
    public void AnUnwritableRegistryWarnsOnceAndTheRunStillTrains()
    {
        var file = Path.Combine(Fixtures.TempDir(), "not-a-folder");
        File.WriteAllText(file, "x");
        var warnings = new List<string>();
        var c = Small("unrecorded");
        c.Steps = 2;
        var r = Train(c, Path.Combine(file, "registry"), warnings); // a registry below a file cannot be created
        Assert.Equal(2, r.Steps);
        Assert.True(File.Exists(Path.Combine(r.AdapterDir, "adapter_model.safetensors")));
        Assert.Contains("not recorded in the registry", Assert.Single(warnings));

        var output = Path.Combine(Fixtures.TempDir(), "cli-unrecorded");
        var (code, stdout, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"),
            "--output", output, "--steps", "1", "--r", "4", "--batch-size", "2", "--device", "cpu", "--registry", file);
        Assert.True(code == 0, stderr);
        Assert.Single(stderr.Split('\n'), l => l.StartsWith("warning: the run is not recorded in the registry"));
        Assert.DoesNotContain("recorded in the registry (", stdout);
        Assert.True(File.Exists(Path.Combine(output, "report.json")));
    }
}

/// <summary><c>report_to</c> tensorboard: TorchSharp's event files hold the same curves as metrics.jsonl.</summary>
[Collection(GlobalRng.Name)]
public class TensorBoardReportTests
{
    /// <summary>The scalar events of a TFRecord events file: (tag, step, value).</summary>
    static List<(string Tag, long Step, float Value)> Scalars(string file)
    {
        var list = new List<(string, long, float)>();
        using var r = new BinaryReader(File.OpenRead(file));
        while (r.BaseStream.Position < r.BaseStream.Length)
        {
            long length = r.ReadInt64();
            r.ReadUInt32(); // the length's masked CRC
            var e = Tensorboard.Event.Parser.ParseFrom(r.ReadBytes((int)length));
            r.ReadUInt32(); // the data's masked CRC
            if (e.Summary is { } s) foreach (var v in s.Value) list.Add((v.Tag, e.Step, v.SimpleValue));
        }
        return list;
    }

    [Fact]
    public void TensorBoardEventFilesHoldTheLossAndEvalCurves()
    {
        var c = TrainingRunTests.Small(Path.Combine(Fixtures.TempDir(), "tb"));
        c.ValidationFraction = 0.34; c.EvalEvery = 2; c.ReportTo = "tensorboard";
        Trainer.Run(c, false, new ListLog());
        var file = Assert.Single(Directory.GetFiles(Path.Combine(c.Output, TensorBoardLog.Folder), "events.out.tfevents.*"));
        var scalars = Scalars(file);
        var records = File.ReadLines(Path.Combine(c.Output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        var losses = records.Where(o => o.ContainsKey("loss")).Select(o => ((long)(int)o["step"]!, (float)(double)o["loss"]!)).ToList();
        Assert.Equal(losses, scalars.Where(s => s.Tag == "train/loss").Select(s => (s.Step, s.Value)));
        var evals = records.Where(o => o.ContainsKey("eval_loss")).Select(o => ((long)(int)o["step"]!, (float)(double)o["eval_loss"]!)).ToList();
        Assert.NotEmpty(evals);
        Assert.Equal(evals, scalars.Where(s => s.Tag == "eval/loss").Select(s => (s.Step, s.Value)));
        Assert.Contains(file[(c.Output.Length + 1)..].Replace(Path.DirectorySeparatorChar, '/'),
            JsonNode.Parse(File.ReadAllText(Path.Combine(c.Output, RunDirectory.ManifestFile)))!["files"]!.AsArray().Select(f => (string)f!));
    }
}
