using System.Text.Json;
using LoraKit.Data;
using LoraKit.Generation;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using Microsoft.Extensions.AI;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The library API: <see cref="LoraKitModel"/> (one object to load, generate, score, adapt and serve) and the
/// in-memory <see cref="Trainer"/> (Step / Evaluate / Save), checked against the lower-level pieces and against
/// <see cref="Trainer.Run"/>, which is built on it.
/// </summary>
[Collection(GlobalRng.Name)]
public class LibraryApiTests
{
    static string Llama => Fixtures.Model("llama");

    static TrainConfig Small(string? output = null) => new()
    {
        Model = Llama, Data = Fixtures.Path_("training", "data.jsonl"), Output = output ?? Path.Combine(Fixtures.TempDir(), "run"),
        R = 4, LoraAlpha = 8, LoraDropout = 0, Lr = 1e-2, BatchSize = 2, Steps = 4, Device = "cpu", Shuffle = false, Schedule = "constant",
    };

    static List<TrainingExample> FileExamples() => File.ReadAllLines(Fixtures.Path_("training", "data.jsonl"))
        .Select(l => TrainingExample.FromText(JsonDocument.Parse(l).RootElement.GetProperty("text").GetString()!)).ToList();

    static Dictionary<string, Tensor> AdapterTensors(string dir)
    {
        using var f = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        return f.Entries.Keys.ToDictionary(k => k, f.Read);
    }

    [Fact]
    public void FromPretrainedGeneratesTransformersGreedyIdsWithoutHandBuiltStopIds()
    {
        using var lm = LoraKitModel.FromPretrained(Llama, device: "cpu");
        Assert.False(lm.Model.training);
        foreach (var g in Fixtures.Json("reference", "llama.json").GetProperty("generations").EnumerateArray())
        {
            var result = lm.Generate(g.GetProperty("prompt").GetString()!, new SamplingOptions { MaxNewTokens = 20 });
            Assert.Equal(Fixtures.Ids(g.GetProperty("output_ids")).Select(x => (int)x), result.OutputIds);
            Assert.Equal(g.GetProperty("text").GetString(), result.Text);
        }
    }

    [Fact]
    public void StopIdsComeFromGenerationConfigAndTheTokenizer()
    {
        var dir = Fixtures.CopyOf(Llama);
        File.WriteAllText(Path.Combine(dir, "generation_config.json"), """{"eos_token_id": [7, 9]}""");
        using var lm = LoraKitModel.FromPretrained(dir, device: "cpu");
        int tokenizerEos = lm.Tokenizer.EosTokenId!.Value;
        Assert.Equal(new[] { 7, 9 }.Append(tokenizerEos).Distinct(), lm.EosTokenIds);
        Assert.Equal(lm.EosTokenIds, StopTokens.EosTokenIds(lm.Model.Config, lm.Tokenizer, dir));
    }

    [Fact]
    public void InMemoryTrainerEqualsTrainRunBitwise()
    {
        // Trainer.Run is orchestration over the in-memory trainer: the same data and options give the same weights.
        var c = Small();
        var log = new ListLog();
        var run = Trainer.Run(c, resume: false, log);

        using var lm = LoraKitModel.FromPretrained(Llama, device: "cpu");
        using var trainer = lm.CreateTrainer(FileExamples(), options: Small());
        Assert.Equal(c.Steps, trainer.TotalSteps);
        var losses = new List<double>();
        while (trainer.StepCount < trainer.TotalSteps) losses.Add(trainer.Step());
        Assert.Equal(log.Steps.Select(s => s.Loss), losses);
        var saved = Path.Combine(Fixtures.TempDir(), "adapter");
        trainer.Save(saved);

        var (x, y) = (AdapterTensors(run.AdapterDir), AdapterTensors(saved));
        Assert.Equal(x.Keys.Order(), y.Keys.Order());
        foreach (var k in x.Keys) Assert.True(x[k].eq(y[k]).all().item<bool>(), $"{k} differs from Trainer.Run's");
        Assert.Equal(File.ReadAllText(Path.Combine(run.AdapterDir, "adapter_config.json")), File.ReadAllText(Path.Combine(saved, "adapter_config.json")));
    }

    [Fact]
    public void EvaluateFallsAsTrainingStepsAndTheSavedAdapterReloads()
    {
        var examples = new[]
        {
            TrainingExample.FromPrompt("reset my password ->", " accounts"),
            TrainingExample.FromPrompt("refund my invoice ->", " billing"),
        };
        using var lm = LoraKitModel.FromPretrained(Llama, device: "cpu");
        double baseLoss = lm.Loss("reset my password -> accounts");
        var lora = new Lora.LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ["q_proj", "v_proj", "down_proj"] };
        using var trainer = lm.CreateTrainer(examples, lora, new TrainConfig { Lr = 2e-2, Steps = 8, BatchSize = 2, Schedule = "constant" });
        double before = trainer.Evaluate(examples);
        for (int i = 0; i < 8; i++) trainer.Step();
        double after = trainer.Evaluate(examples);
        Assert.True(after < before / 2, $"evaluation loss {before} -> {after}");
        Assert.Equal(Trainer.AdapterName, lm.ActiveAdapter);
        double trainedLoss = lm.Loss("reset my password -> accounts");
        Assert.True(trainedLoss < baseLoss);

        var dir = Path.Combine(Fixtures.TempDir(), "adapter");
        trainer.Save(dir);
        using var reloaded = LoraKitModel.FromPretrained(Llama, device: "cpu").WithAdapter(dir);
        Assert.Equal(trainedLoss, reloaded.Loss("reset my password -> accounts"), 6);
        reloaded.UseAdapter(null);
        Assert.Equal(baseLoss, reloaded.Loss("reset my password -> accounts"), 6);
    }

    [Fact]
    public async Task ChatClientAnswersAsGenerateDoesAndOwnsTheModelUntilDisposed()
    {
        using var lm = LoraKitModel.FromPretrained(Llama, device: "cpu");
        ChatTurn[] question = [new("user", "reset my password")];
        var direct = lm.Generate(question, new SamplingOptions { MaxNewTokens = 12 });
        using (var client = lm.AsChatClient())
        {
            Assert.Throws<InvalidOperationException>(() => lm.Generate("hi"));
            var response = await client.GetResponseAsync("reset my password", new ChatOptions { Temperature = 0, MaxOutputTokens = 12 });
            Assert.Equal(direct.Text, response.Text);
            Assert.Equal(direct.OutputIds.Length, (int)response.Usage!.OutputTokenCount!.Value);
        }
        Assert.Equal(direct.OutputIds, lm.Generate(question, new SamplingOptions { MaxNewTokens = 12 }).OutputIds);
    }

    [Fact]
    public void InMemoryTrainerRefusesWhatItCannotTrain()
    {
        using var lm = LoraKitModel.FromPretrained(Llama, device: "cpu");
        Assert.Throws<ArgumentException>(() => lm.CreateTrainer(FileExamples(), options: new TrainConfig { Method = "full" }));
        var ex = Assert.Throws<DataException>(() => lm.CreateTrainer([TrainingExample.FromPrompt("a", "")]));
        Assert.Contains("example:1", ex.Message);
    }
}
