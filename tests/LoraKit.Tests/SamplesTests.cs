using LoraKit.Generation;
using LoraKit.Tokenization;

namespace LoraKit.Tests;

/// <summary>
/// The programs in samples/ run as the README shows them: train an adapter in memory, evaluate it, serve it through
/// IChatClient. They are referenced projects, run in-process (a `dotnet run` each would cost a compile).
/// </summary>
[Collection(GlobalRng.Name)]
public class SamplesTests
{
    [Fact]
    public async Task TrainEvaluateAndChatSamplesRunEndToEnd()
    {
        string model = Fixtures.Model("llama"), adapter = Path.Combine(Fixtures.TempDir(), "adapter");
        Assert.Equal(0, Samples.TrainAdapter.Program.Main([model, adapter]));
        Assert.True(File.Exists(Path.Combine(adapter, "adapter_config.json")) && File.Exists(Path.Combine(adapter, "adapter_model.safetensors")));

        var (before, after, reply) = Samples.EvaluateAdapter.Program.Evaluate(model, adapter);
        Assert.True(after < before, $"loss {before} -> {after}");
        Assert.Equal(0, Samples.EvaluateAdapter.Program.Main([model, adapter]));

        // The chat client answers what the model itself generates for the same conversation.
        string answer = await Samples.ChatWithAdapter.Program.AskAsync(model, adapter, "reset my password");
        Assert.Equal(reply, answer);
        using (var lm = LoraKitModel.FromPretrained(model, device: "cpu").WithAdapter(adapter))
            Assert.Equal(answer, lm.Generate([new ChatTurn("user", "reset my password")], new SamplingOptions { MaxNewTokens = 16 }).Text);
        Assert.Equal(0, await Samples.ChatWithAdapter.Program.Main([model, adapter, "where is my parcel"]));
    }
}
