// Sample: measure an adapter (the loss of a conversation without and with it) and generate with it.
//   dotnet run --project samples/EvaluateAdapter -- [MODEL_DIR] [ADAPTER_DIR]
using LoraKit.Tokenization;

namespace LoraKit.Samples.EvaluateAdapter;

/// <summary>Evaluates an adapter; the test suite calls <see cref="Evaluate"/> and <see cref="Main"/>.</summary>
public static class Program
{
    /// <summary>Loss of a conversation on the base model and with the adapter, and the adapter's greedy reply to its question.</summary>
    public static (double Before, double After, string Reply) Evaluate(string modelDir, string adapterDir)
    {
        ChatTurn[] question = [new("user", "reset my password")];
        ChatTurn[] conversation = [.. question, new("assistant", "team: accounts")];
        using var model = LoraKitModel.FromPretrained(modelDir, device: "cpu");
        double before = model.Loss(model.RenderChat(conversation, addGenerationPrompt: false));
        model.WithAdapter(adapterDir);
        double after = model.Loss(model.RenderChat(conversation, addGenerationPrompt: false));
        string reply = model.Generate(question, new() { MaxNewTokens = 16 }).Text; // greedy; stops at the model's EOS ids
        return (before, after, reply);
    }

    /// <summary>Command line: [MODEL_DIR] [ADAPTER_DIR].</summary>
    public static int Main(string[] args)
    {
        var (before, after, reply) = Evaluate(args.Length > 0 ? args[0] : "fixtures/models/llama", args.Length > 1 ? args[1] : "out/samples/adapter");
        Console.WriteLine($"loss without the adapter {before:F3}, with it {after:F3}; reply: {reply}");
        return after < before ? 0 : 1;
    }
}
