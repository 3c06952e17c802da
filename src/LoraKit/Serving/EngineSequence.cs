using System.Diagnostics;
using LoraKit.Generation;

namespace LoraKit.Serving;

/// <summary>A generation request as the engine sees it between arrival and completion.</summary>
internal sealed record EngineRequest(int[] PromptIds, string? Adapter, SamplingOptions Options, Action<string>? OnText,
    TaskCompletionSource<GenerationResult> Done, CancellationToken Cancel)
{
    public long ArrivedAt { get; } = Stopwatch.GetTimestamp();
}

/// <summary>
/// One sequence in the engine: its tokens (prompt, then output), how many of them have keys and values in the cache
/// (<see cref="Computed"/>), the KV blocks that hold them, and the decoding state. A preempted sequence gives its blocks
/// back and is recomputed later from its tokens (vLLM's recompute preemption); its output so far is kept.
/// </summary>
internal sealed class EngineSequence(EngineRequest request, SequenceState state, TextStreamer? streamer)
{
    public EngineRequest Request { get; } = request;
    public SequenceState State { get; } = state;
    public TextStreamer? Streamer { get; } = streamer;
    public List<int> Tokens { get; } = [.. request.PromptIds];
    public List<int> Blocks { get; } = [];
    /// <summary>Positions whose keys and values are cached.</summary>
    public int Computed { get; set; }
    /// <summary>Tokens still to run through the model (1 while decoding).</summary>
    public int Pending => Tokens.Count - Computed;
    public long? FirstTokenAt { get; set; }
    public long LastTokenAt { get; set; }
}
