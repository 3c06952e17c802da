using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Tests.Fuzz;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// Issue 16's training items: an output directory's foreign files are never deleted (2), resume and divergence (12),
/// the best adapter at the end (13), config files in the user's terms (15), strict data (9), signals (17), corrupt
/// checkpoint state (18).
/// </summary>
[Collection(GlobalRng.Name)]
public class TrainingRunTests
{
    static string TrainingData => Fixtures.Path_("training", "data.jsonl");

    internal static TrainConfig Small(string? output = null) => new()
    {
        Model = Fixtures.Model("llama"), Data = TrainingData, Output = output ?? Path.Combine(Fixtures.TempDir(), "run"),
        R = 4, LoraAlpha = 8, LoraDropout = 0, Lr = 1e-2, BatchSize = 2, Steps = 4, Device = "cpu", Shuffle = false, Schedule = "constant",
    };

    static byte[] Weights(string adapterDir) => File.ReadAllBytes(Path.Combine(adapterDir, "adapter_model.safetensors"));

    static void AssertJsonFilesAreJson(string dir)
    {
        foreach (var f in Directory.EnumerateFiles(dir, "*.json*", SearchOption.AllDirectories))
        {
            var text = File.ReadAllText(f);
            Assert.DoesNotContain("NaN", text);
            Assert.DoesNotContain("Infinity", text);
            if (f.EndsWith(".jsonl")) foreach (var l in text.Split('\n', StringSplitOptions.RemoveEmptyEntries)) JsonNode.Parse(l);
            else JsonNode.Parse(text);
        }
    }

    // ---- item 2: foreign files ----

    [Fact]
    public void ANonEmptyDirectoryIsRefusedAndForeignFilesSurviveOverwrite()
    {
        var output = Path.Combine(Fixtures.TempDir(), "run");
        // The issue's case: a directory with the user's files under LoraKit's names.
        Directory.CreateDirectory(Path.Combine(output, "adapter"));
        Directory.CreateDirectory(Path.Combine(output, "best"));
        File.WriteAllText(Path.Combine(output, "adapter", "precious.txt"), "mine");
        File.WriteAllText(Path.Combine(output, "best", "notes.txt"), "mine");
        File.WriteAllText(Path.Combine(output, "metrics.jsonl"), "{\"mine\": 1}\n");
        File.WriteAllText(Path.Combine(output, "report.html"), "<p>mine</p>");
        var before = FuzzContract.Snapshot(output);
        var ex = Assert.Throws<LoraKitException>(() => Trainer.Run(Small(output), false, new ListLog()));
        Assert.Contains("not empty", ex.Message);
        Assert.Contains("`overwrite`", ex.Message);
        FuzzContract.AssertUntouched(before, output, "refused run");
        // --overwrite replaces only what LoraKit wrote: metrics.jsonl here is the user's, so it is refused too.
        ex = Assert.Throws<LoraKitException>(() => Trainer.Run(Small(output), false, new ListLog(), overwrite: true));
        Assert.Contains("metrics.jsonl was not written by LoraKit", ex.Message);
        FuzzContract.AssertUntouched(before, output, "refused overwrite");
        Assert.Equal(before.Keys.Order(), FuzzContract.Snapshot(output).Keys.Order());

        // Foreign files in every subfolder a run writes (and none under its top-level file names): overwrite keeps them all.
        File.Delete(Path.Combine(output, "metrics.jsonl"));
        File.Delete(Path.Combine(output, "report.html"));
        foreach (var sub in new[] { "last", "checkpoints", Path.Combine("checkpoints", "step-000004"), Path.Combine("checkpoints", "step-000002") })
        {
            Directory.CreateDirectory(Path.Combine(output, sub));
            File.WriteAllText(Path.Combine(output, sub, "keep.txt"), sub);
        }
        File.WriteAllText(Path.Combine(output, "README.md"), "my notes");
        before = FuzzContract.Snapshot(output);
        var c = Small(output);
        c.ValidationFraction = 0.34; c.EvalEvery = 2; c.SaveEvery = 1; // writes adapter/, best/, last/ and checkpoints
        Trainer.Run(c, false, new ListLog(), overwrite: true);
        FuzzContract.AssertUntouched(before, output, "first overwrite");
        Assert.True(File.Exists(Path.Combine(output, "adapter", "adapter_model.safetensors")));
        var first = Weights(Path.Combine(output, "adapter"));

        // Now it is a LoraKit run: a plain run is refused (resume or overwrite), an overwrite replaces LoraKit's files only.
        ex = Assert.Throws<LoraKitException>(() => Trainer.Run(Small(output), false, new ListLog()));
        Assert.Contains("already holds a LoraKit run", ex.Message);
        var c2 = Small(output);
        c2.Seed = 7; c2.Shuffle = true; c2.Steps = 3;
        Trainer.Run(c2, false, new ListLog(), overwrite: true);
        FuzzContract.AssertUntouched(before, output, "second overwrite");
        Assert.NotEqual(first, Weights(Path.Combine(output, "adapter")));
        Assert.False(Directory.Exists(Path.Combine(output, "checkpoints", "step-000004")) && File.Exists(Path.Combine(output, "checkpoints", "step-000004", "COMPLETE")),
            "the first run's checkpoint files must be gone");
        Assert.False(File.Exists(Path.Combine(output, "best", "adapter_model.safetensors")), "the first run's best/ must be gone (this run had no validation)");
    }

    [Fact]
    public void AFileAsOutputOrDebrisOnlyDirectory()
    {
        var dir = Fixtures.TempDir();
        var file = Path.Combine(dir, "out");
        File.WriteAllText(file, "x");
        var ex = Assert.Throws<LoraKitException>(() => Trainer.Run(Small(file), false, new ListLog()));
        Assert.Contains("is a file", ex.Message);
        // Debris of killed runs and merges does not make a directory "not empty", and is left alone.
        var output = Path.Combine(dir, "run");
        Directory.CreateDirectory(Path.Combine(output, ".out.tmp-4242"));
        Directory.CreateDirectory(Path.Combine(output, "adapter"));
        File.WriteAllText(Path.Combine(output, ".out.tmp-4242", "x"), "debris");
        File.WriteAllText(Path.Combine(output, "adapter", "adapter_model.safetensors.tmp"), "half a file");
        Trainer.Run(Small(output), false, new ListLog());
        Assert.True(File.Exists(Path.Combine(output, "adapter", "adapter_model.safetensors")));
    }

    // ---- item 12 (and 18): resume ----

    [Fact]
    public void ResumingAFinishedRunSaysSoChangesNothingAndMoreStepsExtendIt()
    {
        var c = Small();
        var r1 = Trainer.Run(c, false, new ListLog());
        var firstWeights = Weights(r1.AdapterDir);
        var before = FuzzContract.Snapshot(c.Output);
        var log = new ListLog();
        var again = Trainer.Run(Small(c.Output), true, log);
        Assert.Contains(log.Infos, i => i.Contains("already complete") && i.Contains("step 4 of 4"));
        Assert.Equal(before, FuzzContract.Snapshot(c.Output)); // nothing rewritten, nothing added
        Assert.Equal(4, again.Steps);

        var longer = Small(c.Output);
        longer.Steps = 6;
        log = new ListLog();
        var r2 = Trainer.Run(longer, true, log);
        Assert.Contains(log.Infos, i => i.Contains("resumed from") && i.Contains("step-000004"));
        Assert.Equal([5, 6], log.Steps.Select(s => s.Step));
        Assert.Equal(6, r2.Steps);
        var steps = File.ReadLines(Path.Combine(c.Output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!["step"]!.GetValue<int>()).ToList();
        Assert.Equal(Enumerable.Range(1, 6), steps);
        Assert.NotEqual(firstWeights, Weights(r2.AdapterDir));
        AssertJsonFilesAreJson(c.Output);
    }

    [Fact]
    public void ResumeNeedsOnlyTheOutputDirectory()
    {
        var c = Small();
        c.Steps = 2;
        Trainer.Run(c, false, new ListLog());
        var (code, stdout, stderr) = CliTests.RunCli("train", "--output", c.Output, "--resume");
        Assert.True(code == 0, stderr);
        Assert.Contains("already complete", stdout);
        (code, stdout, stderr) = CliTests.RunCli("train", "--output", c.Output, "--resume", "--steps", "3");
        Assert.True(code == 0, stderr);
        Assert.Contains("resumed from", stdout);
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(c.Output, "report.json")))!;
        Assert.Equal(3, report["steps"]!.GetValue<int>());
        Assert.Equal(0.01, report["config"]!["lr"]!.GetValue<double>()); // the checkpoint's config, not the CLI's defaults
    }

    [Fact]
    public void ADivergingLossStopsWithoutWritingNonFiniteJson()
    {
        var c = Small();
        // Warm-up makes step 1's learning rate 0 (a good checkpoint), then 2e29: the weights or the loss blow up at once.
        c.Lr = 1e30; c.WarmupSteps = 5; c.Steps = 6; c.SaveEvery = 1; c.MaxGradNorm = 0;
        var ex = Assert.Throws<LoraKitException>(() => Trainer.Run(c, false, new ListLog()));
        Assert.Matches(@"(loss became non-finite|LoRA weights diverged) at step [2-6]", ex.Message);
        Assert.Contains("last good checkpoint is", ex.Message);
        AssertJsonFilesAreJson(c.Output);
        Assert.NotNull(Checkpoints.Latest(c.Output));
    }

    [Fact]
    public void ACorruptNewestCheckpointFallsBackToThePreviousOne()
    {
        var c = Small();
        c.SaveEvery = 1;
        Trainer.Run(c, false, new ListLog());
        var newest = Checkpoints.Latest(c.Output)!;
        Assert.EndsWith("step-000004", newest);
        var state = Path.Combine(newest, "trainer_state.json");
        File.WriteAllText(state, File.ReadAllText(state)[..40]); // truncated, as by a full disk
        // Debris of a killed run: a step directory without its marker, a temporary checkpoint, a half-written file.
        Directory.CreateDirectory(Path.Combine(Checkpoints.Root(c.Output), "step-000009"));
        Directory.CreateDirectory(Path.Combine(Checkpoints.Root(c.Output), ".tmp-step-000005-99999"));
        File.WriteAllText(Path.Combine(Checkpoints.Root(c.Output), ".tmp-step-000005-99999", "optimizer.safetensors"), "half");
        File.WriteAllText(Path.Combine(c.Output, "adapter", "adapter_model.safetensors.tmp"), "half");
        var longer = Small(c.Output);
        longer.Steps = 5; longer.SaveEvery = 1;
        var log = new ListLog();
        Trainer.Run(longer, true, log);
        Assert.Contains(log.Warnings, w => w.Contains("trainer_state.json") && w.Contains("truncated or invalid JSON") && w.Contains("earlier checkpoint"));
        Assert.Contains(log.Infos, i => i.Contains("resumed from") && i.Contains("step-000003"));
        Assert.Equal([4, 5], log.Steps.Select(s => s.Step));

        // Every checkpoint unreadable: one clear error.
        foreach (var d in Checkpoints.Complete(c.Output)) File.WriteAllText(Path.Combine(d, "optimizer.safetensors"), "x");
        var ex = Assert.Throws<LoraKitException>(() => Trainer.Run(longer, true, new ListLog()));
        Assert.Contains("no complete, readable checkpoint", ex.Message);
    }

    // ---- item 13 ----

    [Fact]
    public void WithValidationTheAdapterIsTheBestAndLastIsKept()
    {
        var c = Small();
        c.Lr = 3.0; c.Steps = 8; c.EvalEvery = 1; c.ValidationFraction = 0.34; c.MaxGradNorm = 0; // validation loss worsens after a step or two
        var log = new ListLog();
        var r = Trainer.Run(c, false, log);
        Assert.True(r.Best!.Step < r.Steps, $"best step {r.Best.Step} of {r.Steps}: this test needs a best before the end");
        Assert.Equal(Weights(Path.Combine(c.Output, "best")), Weights(r.AdapterDir));
        Assert.NotEqual(Weights(Path.Combine(c.Output, "last")), Weights(r.AdapterDir));
        Assert.Contains(log.Infos, i => i.Contains("is the best adapter by eval_loss") && i.Contains($"step {r.Best.Step}") && i.Contains("last"));
    }

    // ---- item 15: config files ----

    static string Write(string name, string text)
    {
        var path = Path.Combine(Fixtures.TempDir(), name);
        File.WriteAllText(path, text);
        return path;
    }

    [Fact]
    public void ConfigFilesAcceptHuggingFaceAndPeftSpellings()
    {
        var yaml = Write("hf.yaml", """
            model_name_or_path: m
            train_file: d.jsonl
            output_dir: out
            learning_rate: 1e-4
            num_train_epochs: 3
            per_device_train_batch_size: 8
            gradient_accumulation_steps: 4
            lora_r: 16
            lora_alpha: 32
            lora_dropout: 0.1
            target_modules: all-linear
            warmup_steps: 10
            weight_decay: 0.01
            max_grad_norm: 0.3
            lr_scheduler_type: constant_with_warmup
            max_steps: -1
            seed: 42
            bf16: true
            task_type: CAUSAL_LM
            bias: none
            """);
        var c = TrainConfig.Load(yaml);
        Assert.Equal(("m", "d.jsonl", "out"), (c.Model, c.Data, c.Output));
        Assert.Equal((1e-4, 3.0, 8, 4, 16, 32.0, 0.1), (c.Lr, c.Epochs, c.BatchSize, c.GradAccum, c.R, c.LoraAlpha, c.LoraDropout));
        Assert.Equal(["all-linear"], c.TargetModules);
        Assert.Equal((10, 0.01, 0.3, "constant", 0, 42, "bf16"), (c.WarmupSteps, c.WeightDecay, c.MaxGradNorm, c.Schedule, c.Steps, c.Seed, c.Dtype));
        var json = Write("peft.json", """{"learning_rate": 0.001, "target_modules": ["q_proj", "v_proj"], "max_steps": 5}""");
        c = TrainConfig.Load(json);
        Assert.Equal((0.001, 5), (c.Lr, c.Steps));
        Assert.Equal(["q_proj", "v_proj"], c.TargetModules);
    }

    [Theory]
    [InlineData("a.yaml", "model: m\nlr_rate: 0.1\n", "a.yaml:2: unknown key 'lr_rate' (did you mean 'lr'?)")]
    [InlineData("a.yaml", "model: m\nlearning_rat: 0.1\n", "a.yaml:2: unknown key 'learning_rat' (did you mean 'lr'?)")]
    [InlineData("a.yaml", "batch_size: 8\nper_device_train_batch_size: 4\n", "a.yaml:2: 'per_device_train_batch_size' and 'batch_size' (line 1) both set batch_size")]
    [InlineData("a.yaml", "lr: fast\n", "a.yaml:1: 'lr' must be a number, not 'fast'")]
    [InlineData("a.yaml", "steps: 2.5\n", "a.yaml:1: 'steps' must be an integer, not 2.5")]
    [InlineData("a.yaml", "target_modules:\n  q: 1\n", "a.yaml:1: 'target_modules' must be a list of names")]
    [InlineData("a.yaml", "lr: 1\nlr: 2\n", "a.yaml:2: key 'lr' is set twice (first on line 1)")]
    [InlineData("a.yaml", "warmup_ratio: 0.1\n", "a.yaml:1: unknown key 'warmup_ratio' (LoraKit counts warm-up in steps: use warmup_steps)")]
    [InlineData("a.yaml", "packing: maybe\n", "a.yaml:1: 'packing' must be true or false, not 'maybe'")]
    [InlineData("a.json", "{\n  \"model\": \"m\",\n  \"target_modules\": 5\n}", "a.json:3: 'target_modules' must be a list of names (or one name, e.g. all-linear), not a number")]
    [InlineData("a.json", "{\n  \"r\": \"8\"\n}", "a.json:2: 'r' must be an integer, not the string \"8\"")]
    [InlineData("a.json", "{\"lr\": 1, \"lr\": 2}", "a.json:1: key 'lr' is set twice")]
    [InlineData("a.json", "{\n\"lr\": 1,,\n}", "a.json:2: invalid JSON")]
    [InlineData("a.json", "[1, 2]", "a.json:1: a train config is one JSON object")]
    public void ConfigErrorsNameTheFileLineAndKey(string name, string text, string expected)
    {
        var path = Write(name, text);
        var ex = Assert.Throws<LoraKitException>(() => TrainConfig.Load(path));
        Assert.Contains(expected, ex.Message);
        Assert.Null(FuzzContract.JudgeMessage(ex.Message));
    }

    [Fact]
    public void YamlBillionLaughsIsRefusedInSeconds()
    {
        var lines = new List<string> { "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]" };
        for (int i = 0; i < 9; i++) lines.Add($"{(char)('b' + i)}: &{(char)('b' + i)} [*{(char)('a' + i)},*{(char)('a' + i)},*{(char)('a' + i)},*{(char)('a' + i)},*{(char)('a' + i)},*{(char)('a' + i)},*{(char)('a' + i)},*{(char)('a' + i)},*{(char)('a' + i)}]");
        var path = Write("laughs.yaml", string.Join("\n", lines) + "\n");
        Assert.True(new FileInfo(path).Length < 1000);
        var sw = Stopwatch.StartNew();
        var ex = Assert.Throws<LoraKitException>(() => TrainConfig.Load(path));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5));
        Assert.Contains("laughs.yaml:1: YAML anchors and aliases", ex.Message);
        // Anchors on a single value too.
        path = Write("anchor.yaml", "lr: &x 0.1\nweight_decay: *x\n");
        Assert.Contains("anchor.yaml:1: YAML anchors", Assert.Throws<LoraKitException>(() => TrainConfig.Load(path)).Message);
    }

    // ---- item 9: data ----

    [Fact]
    public void InvalidUtf8AndBadLabelsAreNamed()
    {
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        var path = Path.Combine(Fixtures.TempDir(), "bad.jsonl");
        using (var f = File.Create(path))
        {
            f.Write("{\"text\": \"fine\"}\n"u8);
            f.Write("{\"text\": \"caf"u8); f.Write([0xC3, 0x28]); f.Write("\"}\n"u8);
        }
        var ex = Assert.Throws<DataException>(() => JsonlDataset.Load(path, tok, new DataOptions()));
        Assert.Contains($"{path}:2: invalid UTF-8", ex.Message);
        var (samples, summary) = JsonlDataset.Load(path, tok, new DataOptions { SkipBadLines = true });
        Assert.Single(samples);
        Assert.Equal(1, summary.Skipped);

        // A byte order mark and CRLF line ends are read, not reported.
        var bom = Path.Combine(Fixtures.TempDir(), "bom.jsonl");
        File.WriteAllBytes(bom, [.. System.Text.Encoding.UTF8.Preamble, .. "{\"text\": \"a\"}\r\n{\"text\": \"b\"}\r\n"u8]);
        Assert.Equal(2, JsonlDataset.Load(bom, tok, new DataOptions()).samples.Count);

        var labels = Path.Combine(Fixtures.TempDir(), "labels.jsonl");
        File.WriteAllLines(labels, ["{\"text\": \"a\", \"label\": \"x\"}", "{\"text\": \"b\", \"label\": {\"k\": 1}}", "{\"text\": \"c\", \"label\": \"y\"}"]);
        var known = JsonlDataset.ClassificationLabels(labels)!;
        Assert.Equal(["x", "y"], known);
        ex = Assert.Throws<DataException>(() => JsonlDataset.Load(labels, tok, new DataOptions(), known));
        Assert.Contains(":2: field \"label\" must be a non-empty string or a number, not object", ex.Message);
        File.WriteAllLines(labels, ["{\"text\": \"a\", \"label\": null}"]);
        ex = Assert.Throws<DataException>(() => JsonlDataset.Load(labels, tok, new DataOptions(), JsonlDataset.ClassificationLabels(labels)));
        Assert.Contains(":1: field \"label\" must be a non-empty string or a number, not null", ex.Message);

        File.WriteAllLines(labels, Enumerable.Range(0, 6).Select(i => $"{{\"text\": \"t{i}\", \"label\": \"only\"}}"));
        var c = Small();
        c.Model = Fixtures.Model("qwen2"); c.Data = labels;
        ex = Assert.Throws<DataException>(() => Trainer.Run(c, false, new ListLog()));
        Assert.Contains("classification needs at least two labels, but every line has label 'only'", ex.Message);
    }

    // ---- item 17: signals ----

    [Theory]
    [InlineData("INT")]
    [InlineData("TERM")]
    public async Task ASignalSavesACheckpointAndTheAdapter(string signal)
    {
        var output = Path.Combine(Fixtures.TempDir(), "run");
        var psi = new ProcessStartInfo("dotnet") { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "LoraKit.Cli.dll"));
        foreach (var a in new[] { "train", "--model", Fixtures.Model("llama"), "--data", TrainingData, "--output", output, "--steps", "200", "--batch-size", "2",
                     "--r", "4", "--save-every", "100", "--device", "cpu" })
            psi.ArgumentList.Add(a);
        psi.Environment["LORAKIT_TEST_STEP_DELAY_MS"] = "100";
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        _ = p.StandardOutput.ReadToEndAsync();
        var metrics = Path.Combine(output, "metrics.jsonl");
        var deadline = DateTime.UtcNow.AddSeconds(90);
        while (!(File.Exists(metrics) && new FileInfo(metrics).Length > 0) && !p.HasExited && DateTime.UtcNow < deadline) Thread.Sleep(20);
        Assert.False(p.HasExited, "the run ended before it could be signalled");
        Process.Start("kill", ["-" + signal, p.Id.ToString()])!.WaitForExit();
        Assert.True(p.WaitForExit(60_000), "the run did not stop after the signal");
        string err = await stderr;
        Assert.Equal(130, p.ExitCode);
        Assert.Contains("training interrupted at step", err);
        Assert.Contains($"lorakit train --output {output} --resume", err);
        var ckpt = Checkpoints.Latest(output)!;
        Assert.NotNull(ckpt);
        var state = Checkpoints.ReadState(ckpt);
        Assert.Contains($"interrupted at step {state.Step} of 200", err);
        Assert.True(state.Step < 200);
        Assert.True(File.Exists(Path.Combine(output, "adapter", "adapter_model.safetensors")));
        Assert.DoesNotContain("   at ", err);
    }
}
