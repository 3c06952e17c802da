using System.Threading.Channels;
using LoraKit.Tokenization;

namespace LoraKit.Serving;

/// <summary>
/// Detokenizes one request's tokens and streams the text on a thread-pool task, so the engine thread only hands over
/// token ids. Emits what the text grew by, holding back a trailing U+FFFD (half of a multi-byte character) as
/// <c>SequenceState</c> does. <see cref="CompleteAsync"/> flushes the final text before the request completes.
/// </summary>
internal sealed class TextStreamer
{
    readonly Channel<int> _tokens = Channel.CreateUnbounded<int>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
    readonly Tokenizer _tok;
    readonly Action<string> _onText;
    readonly List<int> _output = [];
    readonly Task _pump;
    string _emitted = "";

    /// <summary>Set when the text callback threw (a client gone away): the engine then fails the request.</summary>
    public Exception? Error { get; private set; }

    public TextStreamer(Tokenizer tokenizer, Action<string> onText)
    {
        (_tok, _onText) = (tokenizer, onText);
        _pump = Task.Run(PumpAsync);
    }

    /// <summary>Engine thread: one more output token.</summary>
    public void Push(int token) => _tokens.Writer.TryWrite(token);

    async Task PumpAsync()
    {
        try
        {
            while (await _tokens.Reader.WaitToReadAsync())
            {
                while (_tokens.Reader.TryRead(out int t)) _output.Add(t); // a burst of tokens is decoded once
                var text = _tok.Decode(_output, skipSpecialTokens: true);
                Emit(text.EndsWith('\uFFFD') ? text[..^1] : text);
            }
        }
        catch (Exception e)
        {
            Error = e;
            throw;
        }
    }

    /// <summary>Ends the stream with the request's final text (no more tokens follow) once every token is streamed.</summary>
    public async Task CompleteAsync(string finalText)
    {
        _tokens.Writer.TryComplete();
        await _pump;
        Emit(finalText);
    }

    void Emit(string text)
    {
        if (text.Length <= _emitted.Length || !text.StartsWith(_emitted, StringComparison.Ordinal)) return;
        try { _onText(text[_emitted.Length..]); }
        finally { _emitted = text; }
    }
}
