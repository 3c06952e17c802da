using System.Diagnostics;
using System.Text.Json.Nodes;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Tests;

sealed class ListLog : ITrainLog
{
    public List<string> Infos { get; } = [];
    public List<string> Warnings { get; } = [];
    public List<StepMetrics> Steps { get; } = [];
    public List<EvalMetrics> Evals { get; } = [];
    public void Info(string m) => Infos.Add(m);
    public void Warn(string m) => Warnings.Add(m);
    public void Step(StepMetrics m) => Steps.Add(m);
    public void Eval(EvalMetrics m) => Evals.Add(m);
}

[Collection(GlobalRng.Name)]
public class TrainingTests
{
    static string TrainingData => Fixtures.Path_("training", "data.jsonl");

    static TrainConfig Small(string? output = null) => new()
    {
        Model = Fixtures.Model("llama"), Data = TrainingData, Output = output ?? Path.Combine(Fixtures.TempDir(), "run"),
        R = 4, LoraAlpha = 8, LoraDropout = 0, Lr = 1e-2, BatchSize = 2, Steps = 4, Device = "cpu", Shuffle = false, Schedule = "constant",
    };

    static Dictionary<string, Tensor> Adapter(string dir)
    {
        using var f = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        return f.Entries.Keys.ToDictionary(k => k, f.Read);
    }

    static void AssertSameAdapters(string a, string b, double tol = 0)
    {
        var x = Adapter(a);
        var y = Adapter(b);
        Assert.Equal(x.Keys.Order(), y.Keys.Order());
        foreach (var k in x.Keys)
            Assert.True(tol == 0 ? x[k].eq(y[k]).all().item<bool>() : Close.RelError(x[k], y[k]) <= tol, $"{k} differs ({Close.RelError(x[k], y[k]):E2})");
    }

    [Theory]
    [InlineData("llama")]
    [InlineData("phi3")]
    [InlineData("phi4mini")]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void ReproducesPeftAdamWTrajectory(string arch)
    {
        // The exact command the issue specifies, on the fixture made with PEFT + torch.optim.AdamW.
        var output = Path.Combine(Fixtures.TempDir(), $"peft-trajectory-{arch}");
        var (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Model(arch), "--data", TrainingData, "--output", output,
            "--init-adapter", Fixtures.Path_("adapters", arch, "a"), "--lr", "1e-3", "--batch-size", "2", "--steps", "3",
            "--schedule", "constant", "--warmup-steps", "0", "--weight-decay", "0", "--max-grad-norm", "0", "--no-shuffle", "--no-eos",
            "--train-on-all-tokens", "--seed", "0");
        Assert.True(code == 0, stderr);
        var expected = Fixtures.Json("training", arch + "_trajectory.json").GetProperty("losses").EnumerateArray().Select(x => x.GetDouble()).ToArray();
        var losses = File.ReadLines(Path.Combine(output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).Where(n => n["loss"] != null)
            .Select(n => n["loss"]!.GetValue<double>()).ToArray();
        Assert.Equal(expected.Length, losses.Length);
        for (int i = 0; i < expected.Length; i++) Assert.True(Math.Abs(losses[i] - expected[i]) <= 1e-4, $"step {i + 1}: {losses[i]} vs PEFT {expected[i]}");
        using var peftFinal = SafetensorsFile.Open(Fixtures.Path_("training", arch + "_trajectory_final.safetensors"));
        var mine = Adapter(Path.Combine(output, "adapter"));
        foreach (var (key, t) in mine)
        {
            var peftKey = key.Replace(".lora_A.weight", ".lora_A.default.weight").Replace(".lora_B.weight", ".lora_B.default.weight");
            Assert.True(Close.RelError(t, peftFinal.Read(peftKey)) <= 1e-4, $"{arch} {key}");
        }
    }

    [Fact]
    public void GradientAccumulationEqualsOneBigBatch()
    {
        var big = Small();
        big.BatchSize = 4; big.GradAccum = 1; big.Steps = 3; big.MaxGradNorm = 1.0;
        var acc = Small();
        acc.BatchSize = 2; acc.GradAccum = 2; acc.Steps = 3; acc.MaxGradNorm = 1.0;
        var rBig = Trainer.Run(big, false, new ListLog());
        var rAcc = Trainer.Run(acc, false, new ListLog());
        AssertSameAdapters(rBig.AdapterDir, rAcc.AdapterDir, tol: 1e-4); // the fp32 tolerance; per-micro-batch averaging would be off by far more
        Assert.True(Math.Abs(rBig.FinalLoss - rAcc.FinalLoss) < 1e-5);
    }

    [Fact]
    public void SameSeedGivesIdenticalAdaptersAndOtherSeedsDiffer()
    {
        TrainConfig Cfg(int seed) { var c = Small(); c.Seed = seed; c.LoraDropout = 0.1; c.Shuffle = true; c.Steps = 5; c.InitAdapter = null; return c; }
        var a = Trainer.Run(Cfg(1), false, new ListLog());
        // The same seed while something else in the process draws from torch's global generator (another run, a test,
        // a request): a run's randomness (dropout, shuffling, initialisation) must come from its seed alone.
        using var stop = new CancellationTokenSource();
        var noise = new Thread(() => { while (!stop.IsCancellationRequested) { using var _ = randn(64); using var __ = rand(64).bernoulli(); } });
        noise.Start();
        TrainResult b;
        try { b = Trainer.Run(Cfg(1), false, new ListLog()); }
        finally { stop.Cancel(); noise.Join(); }
        var c = Trainer.Run(Cfg(2), false, new ListLog());
        AssertSameAdapters(a.AdapterDir, b.AdapterDir);
        var x = Adapter(a.AdapterDir);
        var y = Adapter(c.AdapterDir);
        double largest = x.Keys.Max(k => (x[k] - y[k]).abs().max().item<float>());
        Assert.True(largest > 1e-3, $"another seed gave the same adapter (largest difference {largest:E2})");
    }

    [Fact]
    public void KilledRunResumesBitExactly()
    {
        string[] Args(string output) =>
        [
            "train", "--model", Fixtures.Model("llama"), "--data", TrainingData, "--output", output, "--steps", "10", "--batch-size", "2",
            "--lr", "1e-2", "--lora-dropout", "0.1", "--save-every", "1", "--seed", "3", "--r", "4", "--device", "cpu",
        ];
        var straight = Path.Combine(Fixtures.TempDir(), "straight");
        var (code, _, err) = CliTests.RunCli(Args(straight));
        Assert.True(code == 0, err);

        var killed = Path.Combine(Fixtures.TempDir(), "killed");
        var psi = new ProcessStartInfo("dotnet") { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "LoraKit.Cli.dll"));
        foreach (var a in Args(killed)) psi.ArgumentList.Add(a);
        psi.Environment["LORAKIT_TEST_STEP_DELAY_MS"] = "300";
        using (var p = Process.Start(psi)!)
        {
            var marker = Path.Combine(Checkpoints.Root(killed), "step-000005", Checkpoints.Marker);
            var deadline = DateTime.UtcNow.AddSeconds(90);
            while (!File.Exists(marker) && !p.HasExited && DateTime.UtcNow < deadline) Thread.Sleep(20);
            Assert.True(File.Exists(marker), "the run never completed its step-5 checkpoint");
            Assert.False(p.HasExited, "the run finished before it could be killed");
            Process.Start("kill", ["-9", p.Id.ToString()])!.WaitForExit(); // SIGKILL: no cleanup runs
            p.WaitForExit();
        }
        Assert.False(File.Exists(Path.Combine(killed, "adapter", "adapter_model.safetensors")), "the killed run must not have finished");
        (code, var stdout, err) = CliTests.RunCli([.. Args(killed), "--resume"]);
        Assert.True(code == 0, err);
        Assert.Contains("resumed from", stdout);
        AssertSameAdapters(Path.Combine(straight, "adapter"), Path.Combine(killed, "adapter"));
        var steps = File.ReadLines(Path.Combine(killed, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!["step"]!.GetValue<int>()).ToList();
        Assert.Equal(Enumerable.Range(1, 10), steps); // one uninterrupted log
    }

    [Fact]
    public void ResumeWithOtherConfigOrDataSaysWhatDiffers()
    {
        var c = Small();
        Trainer.Run(c, false, new ListLog());
        var changed = Small(c.Output);
        changed.Lr = 2e-2;
        var ex = Assert.Throws<LoraKitException>(() => Trainer.Run(changed, true, new ListLog()));
        Assert.Contains("lr: 0.01 → 0.02", ex.Message);

        var data = Path.Combine(Fixtures.TempDir(), "data.jsonl");
        File.WriteAllLines(data, File.ReadAllLines(TrainingData).Reverse());
        var otherData = Small(c.Output);
        otherData.Data = data;
        ex = Assert.Throws<LoraKitException>(() => Trainer.Run(otherData, true, new ListLog()));
        Assert.Contains("data", ex.Message);

        // And a fresh run into a directory that holds one is refused rather than overwriting it.
        ex = Assert.Throws<LoraKitException>(() => Trainer.Run(Small(c.Output), false, new ListLog()));
        Assert.Contains("`resume`", ex.Message);
    }

    [Fact]
    public void MalformedLinesAreNamedOrSkippedAndCounted()
    {
        var path = Path.Combine(Fixtures.TempDir(), "bad.jsonl");
        File.WriteAllLines(path, ["{\"prompt\": \"a\", \"completion\": \" b\"}", "{not json", "{\"prompt\": \"x\"}", "{\"prompt\": \"a\", \"completion\": \"\"}", "{\"prompt\": \"c\", \"completion\": \" d\"}"]);
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        var ex = Assert.Throws<DataException>(() => JsonlDataset.Load(path, tok, new DataOptions()));
        Assert.Contains($"{path}:2: invalid JSON", ex.Message);
        var (samples, summary) = JsonlDataset.Load(path, tok, new DataOptions { SkipBadLines = true });
        Assert.Equal(2, samples.Count);
        Assert.Equal(3, summary.Skipped);
        Assert.Contains(summary.Problems, p => p.Contains(":3: missing field \"completion\""));
        Assert.Contains(summary.Problems, p => p.Contains(":4: field \"completion\" is empty"));

        var chat = Path.Combine(Fixtures.TempDir(), "chat.jsonl");
        File.WriteAllLines(chat, ["{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"wizard\", \"content\": \"x\"}]}"]);
        ex = Assert.Throws<DataException>(() => JsonlDataset.Load(chat, tok, new DataOptions()));
        Assert.Contains(":1: message 1 has unknown role 'wizard'", ex.Message);
    }

    [Fact]
    public void ChatLabelsCoverExactlyTheAssistantTurns()
    {
        var path = Path.Combine(Fixtures.TempDir(), "chat.jsonl");
        File.WriteAllLines(path, ["{\"messages\": [{\"role\": \"user\", \"content\": \"reset my password\"}, {\"role\": \"assistant\", \"content\": \"accounts\"}, {\"role\": \"user\", \"content\": \"my invoice\"}, {\"role\": \"assistant\", \"content\": \"billing\"}]}"]);
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        var (samples, _) = JsonlDataset.Load(path, tok, new DataOptions());
        var s = samples[0];
        var template = new ChatTemplate(tok.Config.ChatTemplate!);
        var full = template.Render([new("user", "reset my password"), new("assistant", "accounts"), new("user", "my invoice"), new("assistant", "billing")], false, tok.Config);
        Assert.Equal(full, tok.Decode(s.InputIds));
        // Decode each run of trained positions: exactly the two assistant replies with their end-of-turn tokens.
        var spans = new List<string>();
        var current = new List<int>();
        for (int i = 0; i <= s.InputIds.Length; i++)
        {
            if (i < s.InputIds.Length && s.Labels[i] != Sample.IgnoreIndex) { current.Add(s.InputIds[i]); continue; }
            if (current.Count > 0) { spans.Add(tok.Decode(current)); current.Clear(); }
        }
        Assert.Equal(["accounts<|im_end|>\n", "billing<|im_end|>\n"], spans);
    }

    [Fact]
    public void WarnsWhenTheTrainedEndOfTurnIsNotAStopToken()
    {
        var dir = Fixtures.CopyOf(Fixtures.Model("qwen2"));
        File.WriteAllText(Path.Combine(dir, "generation_config.json"), "{\"eos_token_id\": 0}");
        var data = Path.Combine(Fixtures.TempDir(), "chat.jsonl");
        File.WriteAllLines(data, Enumerable.Repeat("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}", 4));
        var c = Small();
        c.Model = dir; c.Data = data; c.Steps = 1;
        var log = new ListLog();
        Trainer.Run(c, false, log);
        Assert.Contains(log.Warnings, w => w.Contains("never stop") && w.Contains("<|im_end|>"));
        // With the real generation config (eos = <|im_end|>) there is no warning.
        var ok = Small(); ok.Model = Fixtures.Model("qwen2"); ok.Data = data; ok.Steps = 1;
        var log2 = new ListLog();
        Trainer.Run(ok, false, log2);
        Assert.DoesNotContain(log2.Warnings, w => w.Contains("never stop"));
    }

    [Fact]
    public void PackedRowsKeepSamplesApart()
    {
        using var model = CausalLM.Load(Fixtures.Model("mistral"), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model("mistral"));
        var (samples, _) = JsonlDataset.Load(TrainingData, tok, new DataOptions());
        using var _ = no_grad();
        double separate = samples.Sum(s => { using var b = Batches.Collate([s], 0, CPU); return (double)Trainer.LossSum(model, b).item<float>(); });
        var packed = Batches.Pack(samples, 64);
        Assert.True(packed.Count < samples.Count);
        using var pb = Batches.Collate(packed, 0, CPU);
        double together = Trainer.LossSum(model, pb).item<float>();
        Assert.True(Math.Abs(separate - together) <= 1e-4 * separate, $"packed {together} vs separate {separate}");
    }

    [Fact]
    public void AdamWMatchesTorchSharpsAdamW()
    {
        manual_seed(5);
        var p1 = new TorchSharp.Modules.Parameter(randn(7, 5), true);
        var p2 = new TorchSharp.Modules.Parameter(p1.detach().clone(), true);
        var mine = new AdamW([("p", p1)], 0.9, 0.95, 1e-8, 0.1);
        var reference = optim.AdamW([p2], lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1);
        for (int i = 0; i < 6; i++)
        {
            var g = randn(7, 5);
            p1.grad!.copy_(g); p2.grad = g.clone(); // mine owns p1's grad buffer (a view of its flat grads)
            mine.Step(3e-3);
            reference.step();
        }
        Assert.True(Close.RelError(p1, p2) < 1e-6);
    }

    [Fact]
    public void SchedulesFollowTransformers()
    {
        // fixtures/training/schedules.json: transformers' get_{constant,linear,cosine}_schedule_with_warmup lr_lambda at
        // every step 0..total (scripts/fixtures/make_schedule_fixtures.py).
        var cases = Fixtures.Json("training", "schedules.json").GetProperty("cases").EnumerateArray().ToList();
        Assert.NotEmpty(cases);
        foreach (var c in cases)
        {
            string schedule = c.GetProperty("schedule").GetString()!;
            int warmup = c.GetProperty("warmup").GetInt32(), total = c.GetProperty("total").GetInt32();
            var factors = c.GetProperty("factors").EnumerateArray().Select(f => f.GetDouble()).ToList();
            Assert.Equal(total + 1, factors.Count);
            for (int step = 0; step <= total; step++)
            {
                double mine = LrSchedule.Factor(schedule, step, warmup, total);
                Assert.True(Math.Abs(mine - factors[step]) <= 1e-9, $"{schedule} warmup {warmup} total {total} step {step}: {mine} vs transformers {factors[step]}");
            }
        }
    }

    [Fact]
    public void NativeMemoryStaysFlatOverManySteps()
    {
        Trainer.Run(Small(), false, new ListLog()); // warm-up (lazy native state)
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        var c1 = Small(); c1.Steps = 3;
        Trainer.Run(c1, false, new ListLog());
        long afterShort = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        var c2 = Small(); c2.Steps = 30; c2.GradientCheckpointing = true; c2.LoraDropout = 0.1;
        Trainer.Run(c2, false, new ListLog());
        long afterLong = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        Assert.Equal(0, afterShort - before); // a finished run leaves no native tensors behind
        Assert.Equal(0, afterLong - afterShort); // and nothing grows with the number of steps
    }

    [Fact]
    public void WritesReportMetricsAndBestAdapter()
    {
        var c = Small();
        c.ValidationFraction = 0.34; c.Steps = 6; c.EvalEvery = 2;
        var r = Trainer.Run(c, false, new ListLog());
        foreach (var f in new[] { "report.json", "report.html", "loss.png", "metrics.jsonl", "adapter/adapter_config.json", "best/adapter_model.safetensors" })
            Assert.True(File.Exists(Path.Combine(c.Output, f)), f);
        Assert.Contains("data:image/png;base64,", File.ReadAllText(Path.Combine(c.Output, "report.html")));
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(c.Output, "report.json")))!;
        Assert.Equal(6, report["steps"]!.GetValue<int>());
        Assert.Equal(6, report["data"]!["samples"]!.GetValue<int>()); // the file's samples; 2 of them were held out
        Assert.NotNull(report["best_eval"]);
        Assert.Equal(3, File.ReadLines(Path.Combine(c.Output, "metrics.jsonl")).Count(l => l.Contains("eval_loss")));
    }

    [Fact]
    public void EarlyStoppingStopsWhenValidationStopsImproving()
    {
        var c = Small();
        c.Lr = 3.0; c.Steps = 40; c.EvalEvery = 1; c.EarlyStoppingPatience = 2; c.ValidationFraction = 0.34; c.MaxGradNorm = 0;
        var log = new ListLog();
        var r = Trainer.Run(c, false, log);
        Assert.True(r.StoppedEarly);
        Assert.True(r.Steps < 40);
        Assert.Equal(2, log.Evals.SkipWhile(e => e.Step <= r.Best!.Step).Count());
    }

    [Fact]
    public void FullFineTuneWritesALoadableCheckpoint()
    {
        var c = Small();
        c.Method = "full"; c.Lr = 1e-3; c.Steps = 3;
        var log = new ListLog();
        var r = Trainer.Run(c, false, log);
        Assert.Contains(log.Infos, i => i.Contains("trainable%: 100.0000"));
        // The saved checkpoint holds exactly the trained weights (those of the last step's training checkpoint) ...
        using var m = CausalLM.Load(r.AdapterDir, ScalarType.Float32, CPU);
        using var trained = SafetensorsFile.Open(Path.Combine(Checkpoints.Latest(c.Output)!, "model.safetensors"));
        var saved = m.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        int compared = 0;
        foreach (var key in trained.Entries.Keys)
        {
            if (!saved.TryGetValue(key, out var p)) continue;
            using var t = trained.Read(key);
            Assert.True(p.eq(t).all().item<bool>(), $"{key}: the saved model differs from the trained weights");
            compared++;
        }
        Assert.True(compared >= saved.Count - 1, $"compared {compared} of {saved.Count} tensors"); // a tied head is saved once
        // ... and they fit the training data better than the base did, by a clear margin.
        using var baseModel = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var (samples, _) = JsonlDataset.Load(TrainingData, tok, new DataOptions());
        double before = Trainer.Evaluate(baseModel, samples, 2, 0, CPU), after = Trainer.Evaluate(m, samples, 2, 0, CPU);
        Assert.True(after < before - 0.05, $"loss on the training data went from {before:F4} to {after:F4}");
    }

    [Fact]
    public void YamlConfigWithCliOverride()
    {
        var dir = Fixtures.TempDir();
        var yaml = Path.Combine(dir, "run.yaml");
        File.WriteAllText(yaml, $"model: {Fixtures.Model("llama")}\ndata: {TrainingData}\nlr: 0.005\nsteps: 2\nbatch_size: 2\nr: 4\nlora_alpha: 8\n");
        var output = Path.Combine(dir, "out");
        var (code, _, err) = CliTests.RunCli("train", "--config", yaml, "--steps", "3", "--output", output, "--device", "cpu");
        Assert.True(code == 0, err);
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(output, "report.json")))!;
        Assert.Equal(3, report["steps"]!.GetValue<int>());
        Assert.Equal(0.005, report["config"]!["lr"]!.GetValue<double>());
        (code, var help, _) = CliTests.RunCli("train", "--help");
        foreach (var flag in new[] { "--lr", "--batch-size", "--grad-accum", "--no-shuffle", "--no-eos", "--train-on-all-tokens", "--packing", "--early-stopping-patience", "--resume", "--config" })
            Assert.Contains(flag, help);
        Assert.Contains("[default: 0.0002]", help);
    }
}

[Collection(GlobalRng.Name)]
public class GradientCheckpointingTests
{
    [Theory]
    [InlineData("qwen3", 0.0)]
    [InlineData("llama", 0.1)] // dropout: the recomputation must replay the same masks
    public void SameLossAndGradientsAsWithout(string arch, double dropout)
    {
        using var lm = new LoraKit.Lora.LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraKit.Lora.LoraConfig { R = 4, LoraAlpha = 8, LoraDropout = dropout, TargetModules = ["q_proj", "v_proj", "down_proj"], InitLoraWeights = "false" }, seed: 1);
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), tok, new DataOptions());
        using var batch = Batches.Collate(samples.Take(3).ToList(), 0, CPU);
        lm.Model.train();
        // Without checkpointing: the reference model as loaded; with: the checkpointing runner (and the grouped-query
        // attention kernel) that TrainingAccelerator swaps in.
        (double loss, List<Tensor> grads) Run(bool checkpointing)
        {
            if (checkpointing) LoraKit.Accelerated.TrainingAccelerator.Apply(lm, new LoraKit.Accelerated.TrainingAcceleration { GradientCheckpointing = true });
            manual_seed(42);
            var loss = Trainer.LossSum(lm.Model, batch);
            loss.backward();
            var grads = lm.Parameters("a").Select(p => p.param.grad!.clone()).ToList();
            foreach (var (_, p) in lm.Parameters("a")) p.grad!.zero_();
            return (loss.item<float>(), grads);
        }
        var (l1, g1) = Run(false);
        var (l2, g2) = Run(true);
        Assert.Equal(l1, l2, 5);
        for (int i = 0; i < g1.Count; i++) Assert.True(Close.RelError(g2[i], g1[i]) <= 1e-5, $"grad {i}");
        Assert.Contains(g1, g => g.abs().sum().item<float>() > 0);
    }
}

[Collection(GlobalRng.Name)]
public class ChunkedLossTests
{
    [Theory]
    [InlineData("qwen2", 7L)]   // tied head, chunks smaller than the batch
    [InlineData("llama", 4096L)] // one chunk
    [InlineData("llama", null)] // the default: as many rows as fit ChunkBytes of logits
    public void SameLossAndGradientsAsFullLogits(string arch, long? chunk)
    {
        using var lm = new LoraKit.Lora.LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        lm.AddAdapter("a", new LoraKit.Lora.LoraConfig { R = 4, TargetModules = ["q_proj", "down_proj"], InitLoraWeights = "false" }, seed: 2);
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        var (samples, _) = JsonlDataset.Load(Fixtures.Path_("training", "data.jsonl"), tok, new DataOptions { TrainOnAllTokens = false });
        using var batch = Batches.Collate(samples.Take(4).ToList(), 0, CPU); // right padding: ignored targets present
        (double, List<Tensor>) Run(bool chunked)
        {
            Tensor loss;
            if (!chunked) loss = Trainer.LossSum(lm.Model, batch);
            else
            {
                var h = lm.Model.model.Forward(batch.InputIds, batch.AttentionMask, null);
                long t = h.shape[1];
                loss = ChunkedLmLoss.Compute(h[.., ..(int)(t - 1)].reshape(-1, h.shape[2]), lm.Model.lm_head.weight, batch.Labels[.., 1..].reshape(-1), chunk);
            }
            (loss * 0.37).backward(); // a non-unit upstream gradient
            var grads = lm.Parameters("a").Select(p => p.param.grad!.clone()).ToList();
            foreach (var (_, p) in lm.Parameters("a")) p.grad!.zero_();
            return (loss.item<float>(), grads);
        }
        var (l1, g1) = Run(false);
        var (l2, g2) = Run(true);
        Assert.True(Math.Abs(l1 - l2) <= 1e-5 * Math.Abs(l1), $"{l1} vs {l2}");
        for (int i = 0; i < g1.Count; i++) Assert.True(Close.RelError(g2[i], g1[i]) <= 1e-5, $"grad {i}: {Close.RelError(g2[i], g1[i])}");
    }
}

[Collection(GlobalRng.Name)]
public class ClassificationTests
{
    static string Write(string dir, string name, IEnumerable<(string text, string label)> rows)
    {
        var path = Path.Combine(dir, name);
        File.WriteAllLines(path, rows.Select(r => System.Text.Json.JsonSerializer.Serialize(new { text = r.text, label = r.label })));
        return path;
    }

    [Fact]
    public void TrainsAScoreHeadWithLoraReportsAccuracyAndReloads()
    {
        var dir = Fixtures.TempDir();
        string[] pre = ["", "hi, ", "please: ", "urgent: ", "hello, "], post = ["", " thanks", " today", " please"];
        var phrases = new Dictionary<string, string[]> { ["accounts"] = ["reset my password", "change my email"], ["billing"] = ["my invoice is wrong", "refund my payment"] };
        var all = (from kv in phrases from ph in kv.Value from p in pre from q in post select (p + ph + q, kv.Key)).ToList();
        var train = Write(dir, "train.jsonl", all.Where((_, i) => i % 4 != 0));
        var valid = Write(dir, "valid.jsonl", all.Where((_, i) => i % 4 == 0));
        var c = new TrainConfig
        {
            Model = Fixtures.Model("qwen2"), Data = train, ValidationData = valid, Output = Path.Combine(dir, "run"), R = 8, LoraAlpha = 16,
            LoraDropout = 0, Lr = 1e-2, BatchSize = 8, Steps = 40, EvalEvery = 10, Metric = "eval_accuracy", Device = "cpu", Schedule = "constant",
        };
        var log = new ListLog();
        var r = Trainer.Run(c, false, log);
        Assert.Contains(log.Infos, i => i.Contains("classification with 2 labels: accounts, billing"));
        Assert.All(log.Evals, e => Assert.NotNull(e.Accuracy));
        Assert.True(r.Best!.Accuracy >= 0.9, $"best accuracy {r.Best.Accuracy}");

        // PEFT-style files: LoRA + score head, SEQ_CLS task with modules_to_save, and the label names.
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(r.AdapterDir, "adapter_config.json")))!;
        Assert.Equal("SEQ_CLS", config["task_type"]!.GetValue<string>());
        Assert.Contains("score", config["modules_to_save"]!.AsArray().Select(x => x!.GetValue<string>()));
        using (var f = SafetensorsFile.Open(Path.Combine(r.AdapterDir, "adapter_model.safetensors")))
            Assert.Equal(new long[] { 2, 64 }, f.Entries[SequenceClassifier.ScoreKey].Shape);

        using var lm = new LoraKit.Lora.LoraModel(CausalLM.Load(Fixtures.Model("qwen2"), ScalarType.Float32, CPU));
        using var clf = SequenceClassifier.Load(lm, r.AdapterDir);
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        var (samples, _) = JsonlDataset.Load(valid, tok, new DataOptions(), clf.Labels);
        var (_, accuracy) = clf.Evaluate(samples, 8, 0);
        Assert.Equal(r.Best!.Accuracy!.Value, accuracy, 6); // the reloaded adapter (the best, adapter/) scores as it did in training
    }
}
