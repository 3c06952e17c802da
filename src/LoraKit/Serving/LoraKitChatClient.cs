using System.Runtime.CompilerServices;
using System.Threading.Channels;
using LoraKit.Generation;
using LoraKit.Tokenization;
using Microsoft.Extensions.AI;
using AiChatMessage = Microsoft.Extensions.AI.ChatMessage;

namespace LoraKit.Serving;

/// <summary>
/// The serving engine in-process, as a Microsoft.Extensions.AI <see cref="IChatClient"/>: <c>ChatOptions.ModelId</c>
/// picks the adapter ("base" = the base model; null = <paramref name="defaultAdapter"/>, itself null for the base model);
/// the chat template, EOS ids and sampling follow the server.
/// </summary>
public sealed class LoraKitChatClient(InferenceEngine engine, AdapterRegistry? registry, IReadOnlyCollection<int> eosTokenIds, string? defaultAdapter = null) : IChatClient
{
    readonly ChatTemplate _template = new(engine.Tokenizer.Config.ChatTemplate ?? throw new InvalidOperationException("the model has no chat template"));

    public async Task<ChatResponse> GetResponseAsync(IEnumerable<AiChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var (ids, adapter, sampling) = Prepare(messages, options);
        using var lease = adapter is null || registry is null ? null : await registry.AcquireAsync(adapter);
        var r = await engine.GenerateAsync(ids, adapter, sampling, null, cancellationToken);
        return new ChatResponse(new AiChatMessage(ChatRole.Assistant, r.Text))
        {
            ModelId = adapter ?? "base",
            FinishReason = r.FinishReason == FinishReason.Stop ? ChatFinishReason.Stop : ChatFinishReason.Length,
            Usage = new UsageDetails { InputTokenCount = ids.Length, OutputTokenCount = r.OutputIds.Length, TotalTokenCount = ids.Length + r.OutputIds.Length },
        };
    }

    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<AiChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var (ids, adapter, sampling) = Prepare(messages, options);
        using var lease = adapter is null || registry is null ? null : await registry.AcquireAsync(adapter);
        var pieces = Channel.CreateUnbounded<string>();
        var task = engine.GenerateAsync(ids, adapter, sampling, p => pieces.Writer.TryWrite(p), cancellationToken);
        _ = task.ContinueWith(_ => pieces.Writer.TryComplete(), TaskScheduler.Default);
        await foreach (var p in pieces.Reader.ReadAllAsync(cancellationToken))
            yield return new ChatResponseUpdate(ChatRole.Assistant, p) { ModelId = adapter ?? "base" };
        var r = await task;
        yield return new ChatResponseUpdate { ModelId = adapter ?? "base", FinishReason = r.FinishReason == FinishReason.Stop ? ChatFinishReason.Stop : ChatFinishReason.Length };
    }

    (int[] ids, string? adapter, SamplingOptions sampling) Prepare(IEnumerable<AiChatMessage> messages, ChatOptions? o)
    {
        var list = messages.Select(m => new ChatTurn(m.Role.Value, m.Text)).ToList();
        var text = _template.Render(list, addGenerationPrompt: true, engine.Tokenizer.Config);
        string? adapter = o?.ModelId is null ? defaultAdapter : o.ModelId == "base" ? null : o.ModelId;
        var sampling = new SamplingOptions
        {
            MaxNewTokens = o?.MaxOutputTokens ?? 256, Temperature = o?.Temperature ?? 1.0, TopP = o?.TopP ?? 1.0, Seed = o?.Seed,
            StopStrings = o?.StopSequences?.ToList() ?? [], EosTokenIds = eosTokenIds,
        };
        return (engine.Tokenizer.Encode(text, addSpecialTokens: false), adapter, sampling);
    }

    public object? GetService(Type serviceType, object? serviceKey = null) =>
        serviceKey is null && serviceType.IsInstanceOfType(this) ? this : null;

    public void Dispose() { }
}
