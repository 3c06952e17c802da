using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>One entry of tokenizer.json's "added_tokens".</summary>
internal sealed record AddedToken(int Id, string Content, bool Special, bool LStrip, bool RStrip, bool SingleWord, bool Normalized);

/// <summary>
/// Added tokens are matched in the raw text before anything else (leftmost, longest first, as HF's Aho-Corasick
/// matcher does); the text between them goes through the normal pipeline.
/// </summary>
internal sealed class AddedVocabulary
{
    readonly List<AddedToken> _tokens;
    readonly Dictionary<int, AddedToken> _byId;

    public AddedVocabulary(JsonElement added)
    {
        if (added.ValueKind is not (JsonValueKind.Array or JsonValueKind.Null or JsonValueKind.Undefined))
            throw new TokenizerFormatException($"'added_tokens' must be a list, got {LoraKit.IO.JsonFiles.KindOf(added)}");
        _tokens = added.ValueKind == JsonValueKind.Array
            ? added.EnumerateArray().Select(a => new AddedToken(
                a.Int("id", "added_tokens[]"), a.Str("content", "added_tokens[]"),
                Flag(a, "special"), Flag(a, "lstrip"), Flag(a, "rstrip"), Flag(a, "single_word"), Flag(a, "normalized"))).ToList()
            : [];
        foreach (var t in _tokens)
            if (t.Id < 0) throw new TokenizerFormatException($"added token '{t.Content}' has the negative id {t.Id}");
        _byId = _tokens.GroupBy(t => t.Id).ToDictionary(g => g.Key, g => g.Last());
        _tokens.Sort((a, b) => b.Content.Length.CompareTo(a.Content.Length));
    }

    static bool Flag(JsonElement e, string name) => e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.True;

    public IReadOnlyCollection<AddedToken> Tokens => _byId.Values;

    public AddedToken? ById(int id) => _byId.GetValueOrDefault(id);

    public AddedToken? ByContent(string content) => _tokens.FirstOrDefault(t => t.Content == content);

    /// <summary>A piece of the input: either an added token or plain text (with its start offset).</summary>
    public readonly record struct Piece(string Text, int Start, AddedToken? Token);

    public List<Piece> Split(string text)
    {
        var pieces = new List<Piece>();
        int pos = 0, plainStart = 0;
        while (pos < text.Length)
        {
            var match = MatchAt(text, pos);
            if (match is null) { pos++; continue; }
            var (tok, start, end) = match.Value;
            start = Math.Max(start, plainStart);
            if (start > plainStart) pieces.Add(new Piece(text[plainStart..start], plainStart, null));
            pieces.Add(new Piece(tok.Content, start, tok));
            pos = plainStart = end;
        }
        if (plainStart < text.Length) pieces.Add(new Piece(text[plainStart..], plainStart, null));
        return pieces;
    }

    (AddedToken tok, int start, int end)? MatchAt(string text, int pos)
    {
        foreach (var t in _tokens) // longest first
        {
            if (t.Content.Length == 0 || string.CompareOrdinal(text, pos, t.Content, 0, t.Content.Length) != 0) continue;
            int end = pos + t.Content.Length;
            if (t.SingleWord && ((pos > 0 && IsWordChar(text[pos - 1])) || (end < text.Length && IsWordChar(text[end])))) continue;
            int start = pos;
            // lstrip/rstrip: the token swallows the whitespace beside it.
            if (t.LStrip) while (start > 0 && char.IsWhiteSpace(text[start - 1])) start--;
            if (t.RStrip) while (end < text.Length && char.IsWhiteSpace(text[end])) end++;
            return (t, start, end);
        }
        return null;
    }

    static bool IsWordChar(char c) => char.IsLetterOrDigit(c) || c == '_';
}
