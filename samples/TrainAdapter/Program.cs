// Sample: train a LoRA adapter on a few in-memory conversations and save it in PEFT's format.
//   dotnet run --project samples/TrainAdapter -- [MODEL_DIR] [ADAPTER_DIR]
// (defaults: the repository's tiny test model fixtures/models/llama, out/samples/adapter)
using LoraKit.Lora;
using LoraKit.Tokenization;
using LoraKit.Training;

namespace LoraKit.Samples.TrainAdapter;

/// <summary>Trains and saves an adapter; the test suite calls <see cref="Train"/> and <see cref="Main"/>.</summary>
public static class Program
{
    /// <summary>What the adapter learns: route a customer request to a team.</summary>
    public static readonly TrainingExample[] Examples =
    [
        TrainingExample.FromChat(new ChatTurn("user", "reset my password"), new ChatTurn("assistant", "team: accounts")),
        TrainingExample.FromChat(new ChatTurn("user", "my card was charged twice"), new ChatTurn("assistant", "team: billing")),
        TrainingExample.FromChat(new ChatTurn("user", "the app crashes on start"), new ChatTurn("assistant", "team: engineering")),
        TrainingExample.FromChat(new ChatTurn("user", "where is my parcel"), new ChatTurn("assistant", "team: shipping")),
    ];

    /// <summary>Trains on <see cref="Examples"/> and saves the adapter; returns the first and last step's loss.</summary>
    public static (double First, double Last) Train(string modelDir, string adapterDir)
    {
        using var model = LoraKitModel.FromPretrained(modelDir, device: "cpu");
        var lora = new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] };
        var options = new TrainConfig { Lr = 5e-3, Steps = 40, BatchSize = 4, Seed = 1 };
        using var trainer = model.CreateTrainer(Examples, lora, options);
        double first = trainer.Step(), last = first;
        while (trainer.StepCount < trainer.TotalSteps) last = trainer.Step();
        trainer.Save(adapterDir);
        return (first, last);
    }

    /// <summary>Command line: [MODEL_DIR] [ADAPTER_DIR].</summary>
    public static int Main(string[] args)
    {
        string modelDir = args.Length > 0 ? args[0] : "fixtures/models/llama";
        string adapterDir = args.Length > 1 ? args[1] : "out/samples/adapter";
        var (first, last) = Train(modelDir, adapterDir);
        Console.WriteLine($"training loss {first:F3} -> {last:F3}; adapter saved to {adapterDir}");
        return last < first ? 0 : 1;
    }
}
