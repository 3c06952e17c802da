using System.Diagnostics;
using System.Text.Json;
using LoraKit.IO;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests.Distributed;

/// <summary>
/// Data parallelism's contract on the tiny Llama fixture: N ranks × batch b take the same optimizer steps as one process
/// × batch N·b (loss normalised by the global batch's target tokens, gradients summed), in process with a fake reducer
/// and end to end through <c>lorakit train --gpus N</c> on CPU (the store's collectives), including a resume with another
/// number of ranks and a rank that dies.
/// </summary>
[Collection(GlobalRng.Name)]
public class DataParallelTrainingTests
{
    static string Llama => Fixtures.Model("llama");
    static string TrainingData => Fixtures.Path_("training", "data.jsonl");

    static List<TrainingExample> Examples() => File.ReadAllLines(TrainingData)
        .Select(l => TrainingExample.FromText(JsonDocument.Parse(l).RootElement.GetProperty("text").GetString()!)).ToList();

    static TrainConfig Options(int batch, int accum) => new()
    {
        R = 4, LoraAlpha = 8, LoraDropout = 0, Lr = 1e-2, BatchSize = batch, GradAccum = accum, Steps = 3, Seed = 7, Schedule = "constant", MaxGradNorm = 1.0,
    };

    static Dictionary<string, Tensor> Trained(LoraKitModel lm, Trainer t)
    {
        var dir = Path.Combine(Fixtures.TempDir(), "adapter");
        t.Save(dir);
        using var f = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        return f.Entries.Keys.ToDictionary(k => k, f.Read);
    }

    [Theory]
    [InlineData(2, 1, 1)]
    [InlineData(2, 1, 2)]
    [InlineData(3, 1, 1)]
    public void ReplicasStepLikeOneProcessWithTheGlobalBatch(int world, int batch, int accum)
    {
        // One process, batch N·b.
        Dictionary<string, Tensor> single;
        var singleLosses = new List<double>();
        using (var lm = LoraKitModel.FromPretrained(Llama, device: "cpu"))
        using (var t = lm.CreateTrainer(Examples(), options: Options(world * batch, accum)))
        {
            for (int i = 0; i < 3; i++) singleLosses.Add(t.Step());
            single = Trained(lm, t);
        }

        // N replicas (threads), batch b each, summing through the fake reducer.
        var group = new InProcessGroup(world);
        var replicas = new Dictionary<string, Tensor>[world];
        var losses = new List<double>[world];
        InProcessGroup.Run(world, r =>
        {
            using var lm = LoraKitModel.FromPretrained(Llama, device: "cpu");
            using var t = new Trainer(lm.Lora, lm.Tokenizer, Examples(), null, Options(batch, accum), Trainer.AdapterName, lm.Directory, group.Member(r));
            losses[r] = [];
            for (int i = 0; i < 3; i++) losses[r].Add(t.Step());
            replicas[r] = Trained(lm, t);
        });

        Assert.True(group.Calls >= 3 * 2, $"{group.Calls} all-reduces in 3 steps: each step sums its gradient bucket(s) and its loss");
        for (int r = 0; r < world; r++)
        {
            Assert.Equal(losses[0], losses[r]); // every rank logs the global batch's loss
            foreach (var (k, v) in replicas[0]) Assert.True(v.eq(replicas[r][k]).all().item<bool>(), $"rank {r} drifted from rank 0 at {k}");
        }
        for (int i = 0; i < 3; i++) Assert.True(Math.Abs(losses[0][i] - singleLosses[i]) <= 1e-5 * Math.Abs(singleLosses[i]), $"step {i + 1}: loss {losses[0][i]} vs {singleLosses[i]}");
        Assert.Equal(single.Keys.Order(), replicas[0].Keys.Order());
        // The project's fp32 tolerance. Measured: about 1.5e-5 after three AdamW steps, the same float noise as one
        // process's batch of 2 against 2 accumulated batches of 1 (rows padded to other lengths, sums in another order).
        foreach (var (k, v) in single)
        {
            double rel = Close.RelError(replicas[0][k], v);
            Assert.True(rel <= 1e-4, $"{k}: {rel:E2} from the one-process adapter");
        }
    }

    static string Cli => Path.Combine(AppContext.BaseDirectory, "LoraKit.Cli.dll");

    static string[] TrainArgs(string output, int batch, int steps, params string[] more) =>
        ["train", "--model", Llama, "--data", TrainingData, "--output", output, "--steps", steps.ToString(), "--batch-size", batch.ToString(),
         "--r", "4", "--lora-dropout", "0", "--save-every", "1", "--device", "cpu", "--registry", Path.Combine(Fixtures.TempDir(), "registry"), .. more];

    [Fact]
    public void GpusFlagRunsRanksThatMatchOneProcessAndResumeWithAnotherCount()
    {
        var root = Fixtures.TempDir();
        // Two ranks × batch 1 for 2 steps.
        var dp = Path.Combine(root, "dp");
        var (code, stdout, stderr) = CliTests.RunCli([.. TrainArgs(dp, 1, 2), "--gpus", "2"]);
        Assert.True(code == 0, stderr + stdout);
        Assert.Contains("[rank 0] data parallel: rank 0 of 2, global batch 2 samples per step", stdout);
        Assert.DoesNotContain("[rank 1] step", stdout); // rank 1 reports nothing but warnings
        var state = Checkpoints.ReadState(Checkpoints.Latest(dp)!);
        Assert.Equal(2, state.Step);
        Assert.Equal(4L, state.SamplesSeen);
        Assert.True(File.Exists(Path.Combine(dp, "report.json")));

        // The same two steps in one process with the global batch give the same adapter (fp32, summed over the store in fp64).
        var one = Path.Combine(root, "one");
        (code, _, stderr) = CliTests.RunCli(TrainArgs(one, 2, 2));
        Assert.True(code == 0, stderr);
        AssertClose(Path.Combine(one, "adapter"), Path.Combine(dp, "adapter"), 1e-4);

        // Resume the two-rank run in one process (the same per-rank batch, so the global batch halves): the data position
        // is counted in samples, so it continues at sample 4 and takes one sample per step.
        (code, stdout, stderr) = CliTests.RunCli([.. TrainArgs(dp, 1, 4), "--resume"]);
        Assert.True(code == 0, stderr);
        Assert.Contains("resumed from", stdout);
        var resumed = Checkpoints.ReadState(Checkpoints.Latest(dp)!);
        Assert.Equal(4, resumed.Step);
        Assert.Equal(6L, resumed.SamplesSeen);
    }

    [Fact]
    public async Task ARankThatDiesStopsTheGroupWithOneLineAndTheLastCheckpointLoads()
    {
        var output = Path.Combine(Fixtures.TempDir(), "killed");
        var psi = new ProcessStartInfo("dotnet") { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Cli);
        foreach (var a in TrainArgs(output, 1, 200, "--gpus", "2")) psi.ArgumentList.Add(a);
        psi.Environment["LORAKIT_TEST_STEP_DELAY_MS"] = "100";
        using var launcher = Process.Start(psi)!;
        var stdout = launcher.StandardOutput.ReadToEndAsync();
        var stderr = launcher.StandardError.ReadToEndAsync();
        try
        {
            var deadline = DateTime.UtcNow.AddSeconds(90);
            while (Checkpoints.Latest(output) is null && !launcher.HasExited && DateTime.UtcNow < deadline) Thread.Sleep(50);
            Assert.False(launcher.HasExited, "the group ended before a rank could be killed");
            int rank1 = RankProcess(launcher.Id, 1) ?? throw new Xunit.Sdk.XunitException("rank 1's process not found");
            var clock = Stopwatch.StartNew();
            Process.Start("kill", ["-9", rank1.ToString()])!.WaitForExit();
            Assert.True(launcher.WaitForExit(30_000), "the group did not stop within 30 s of a rank's death");
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30));
        }
        finally { if (!launcher.HasExited) launcher.Kill(entireProcessTree: true); }
        string err = await stderr;
        _ = await stdout;
        Assert.NotEqual(0, launcher.ExitCode);
        Assert.Contains("error: rank 1 exited with code 137; stopped the other 1 rank(s)", err);
        Assert.DoesNotContain("   at ", err);
        // The last complete checkpoint is intact: a resume in one process picks it up.
        var (code, resumed, resumeErr) = CliTests.RunCli([.. TrainArgs(output, 1, Checkpoints.ReadState(Checkpoints.Latest(output)!).Step + 1), "--resume"]);
        Assert.True(code == 0, resumeErr);
        Assert.Contains("resumed from", resumed);
    }

    /// <summary>The pid of the launched rank <paramref name="rank"/> among <paramref name="parent"/>'s children (Linux /proc).</summary>
    static int? RankProcess(int parent, int rank)
    {
        foreach (var dir in Directory.GetDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid)) continue;
            try
            {
                var stat = File.ReadAllText(Path.Combine(dir, "stat"));
                var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
                if (int.Parse(fields[1]) != parent) continue;
                var env = File.ReadAllText(Path.Combine(dir, "environ")).Split('\0');
                if (env.Contains($"RANK={rank}")) return pid;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException) { }
        }
        return null;
    }

    static void AssertClose(string expectedDir, string actualDir, double tol)
    {
        using var a = SafetensorsFile.Open(Path.Combine(expectedDir, "adapter_model.safetensors"));
        using var b = SafetensorsFile.Open(Path.Combine(actualDir, "adapter_model.safetensors"));
        Assert.Equal(a.Entries.Keys.Order(), b.Entries.Keys.Order());
        foreach (var k in a.Entries.Keys)
        {
            using var x = a.Read(k);
            using var y = b.Read(k);
            double rel = Close.RelError(y, x);
            Assert.True(rel <= tol, $"{k}: {rel:E2}");
        }
    }
}
