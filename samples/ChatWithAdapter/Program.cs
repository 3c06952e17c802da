// Sample: serve an adapter in-process as a Microsoft.Extensions.AI IChatClient.
//   dotnet run --project samples/ChatWithAdapter -- [MODEL_DIR] [ADAPTER_DIR] [QUESTION]
using Microsoft.Extensions.AI;

namespace LoraKit.Samples.ChatWithAdapter;

/// <summary>Asks the adapted model through IChatClient; the test suite calls <see cref="AskAsync"/> and <see cref="Main"/>.</summary>
public static class Program
{
    /// <summary>The adapted model's greedy answer to <paramref name="question"/>, through <see cref="IChatClient.GetResponseAsync"/>.</summary>
    public static async Task<string> AskAsync(string modelDir, string adapterDir, string question)
    {
        using var model = LoraKitModel.FromPretrained(modelDir, device: "cpu").WithAdapter(adapterDir);
        using IChatClient client = model.AsChatClient();
        ChatResponse response = await client.GetResponseAsync(question, new ChatOptions { Temperature = 0, MaxOutputTokens = 16 });
        return response.Text;
    }

    /// <summary>Command line: [MODEL_DIR] [ADAPTER_DIR] [QUESTION].</summary>
    public static async Task<int> Main(string[] args)
    {
        string answer = await AskAsync(args.Length > 0 ? args[0] : "fixtures/models/llama", args.Length > 1 ? args[1] : "out/samples/adapter",
            args.Length > 2 ? args[2] : "reset my password");
        Console.WriteLine(answer);
        return 0;
    }
}
