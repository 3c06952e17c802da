using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Generation;

/// <summary>
/// One sequence being decoded: its sampler, the tokens so far, when to stop (EOS id, stop string, length, the model's
/// context: prompt and output together never exceed <paramref name="contextLength"/> tokens) and the text already
/// streamed. Used by <see cref="TextGenerator"/> and by the serving engine's batch rows alike.
/// </summary>
internal sealed class SequenceState(int[] promptIds, SamplingOptions options, Tokenizer tokenizer, Action<string>? onText, int contextLength = int.MaxValue)
{
    /// <summary>Refuses a prompt that leaves no room in the model's context (max_position_embeddings) for one new token.</summary>
    public static void CheckPromptFits(int promptTokens, int contextLength)
    {
        if (promptTokens >= contextLength)
            throw new LoraKitException($"the prompt has {promptTokens} tokens, but the model's context (max_position_embeddings) is {contextLength} tokens " +
                                       "for prompt and output together; shorten the prompt");
    }

    readonly Sampler _sampler = new(options);
    readonly List<int> _output = [];
    string _emitted = "";

    public int[] PromptIds => promptIds;
    public bool Finished { get; private set; }
    public FinishReason FinishReason { get; private set; } = FinishReason.Length;
    public int LastToken => _output[^1];
    /// <summary>The prompt and the tokens generated so far.</summary>
    public int[] Ids => [.. promptIds, .. _output];

    /// <summary>Samples the next token from last-position logits, records it and reports whether decoding is over.</summary>
    public bool Step(Tensor logits) => Accept(_sampler.Next(logits));

    /// <summary>Samples the next token from last-position logits without recording it (record it with <see cref="Accept"/>).</summary>
    public int Choose(Tensor logits) => _sampler.Next(logits);

    /// <summary>Greedy decoding needs no sampler: batch callers take all rows' argmax at once and hand the token in.</summary>
    public bool IsGreedy => options.IsGreedy;

    /// <summary>Records an already chosen token and reports whether decoding is over.</summary>
    public bool Accept(int next)
    {
        _output.Add(next);
        // The text so far is needed only to stream it or to look for stop strings; decoding it at every token is the
        // largest host cost of a batch step otherwise (batch generation for evaluation needs neither).
        string? text = onText is null && options.StopStrings.Count == 0 ? null : tokenizer.Decode(_output, skipSpecialTokens: true);
        int cut = text is null ? -1 : FirstStop(text, options.StopStrings);
        if (cut >= 0) { Emit(text![..cut]); Finish(FinishReason.Stop); }
        else
        {
            if (text is not null) Emit(text.EndsWith('\uFFFD') ? text[..^1] : text); // a trailing U+FFFD may be half a character
            if (options.EosTokenIds.Contains(next)) Finish(FinishReason.Stop);
            else if (_output.Count >= options.MaxNewTokens || promptIds.Length + _output.Count >= contextLength) Finish(FinishReason.Length);
        }
        return Finished;
    }

    void Finish(FinishReason reason)
    {
        Finished = true;
        FinishReason = reason;
    }

    public GenerationResult Result()
    {
        string text = tokenizer.Decode(_output, skipSpecialTokens: true);
        int stop = FirstStop(text, options.StopStrings);
        if (stop >= 0) text = text[..stop];
        Emit(text);
        return new GenerationResult(promptIds, _output.ToArray(), text, FinishReason);
    }

    void Emit(string text)
    {
        if (onText is null || text.Length <= _emitted.Length || !text.StartsWith(_emitted, StringComparison.Ordinal)) return;
        onText(text[_emitted.Length..]);
        _emitted = text;
    }

    static int FirstStop(string text, IReadOnlyList<string> stops)
    {
        int best = -1;
        foreach (var s in stops)
        {
            int k = text.IndexOf(s, StringComparison.Ordinal);
            if (k >= 0 && (best < 0 || k < best)) best = k;
        }
        return best;
    }
}
