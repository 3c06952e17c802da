using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>
/// A Hugging Face <c>tokenizer.json</c> (BPE family: byte-level like Llama 3 / Qwen / GPT-2, and SentencePiece-style
/// like Llama 2 / Mistral) with the special tokens and chat template of <c>tokenizer_config.json</c>.
/// Encoding follows HF tokenizers: added tokens split first, then per piece normalizer → pre-tokenizer → BPE,
/// then the post-processor (BOS…) when special tokens are requested.
/// </summary>
public sealed class Tokenizer
{
    readonly AddedVocabulary _added;
    readonly Func<string, string> _normalize;
    readonly PreTokenizers.Step _preTokenize;
    readonly BpeModel _model;
    readonly Decoders.Step _decode;
    readonly Func<List<int>, List<int>> _postProcess;
    readonly Dictionary<int, string> _idToToken;

    public TokenizerConfig Config { get; }
    public int VocabSize { get; }

    Tokenizer(JsonElement root, TokenizerConfig config)
    {
        Config = config;
        _added = new AddedVocabulary(root.GetProperty("added_tokens"));
        _normalize = Normalizers.Build(Prop(root, "normalizer"));
        _preTokenize = PreTokenizers.Build(Prop(root, "pre_tokenizer"));
        _model = new BpeModel(root.GetProperty("model"));
        _decode = Decoders.Build(Prop(root, "decoder"));
        _postProcess = PostProcessor.Build(Prop(root, "post_processor"));
        _idToToken = _model.Vocab.ToDictionary(kv => kv.Value, kv => kv.Key);
        foreach (var t in _added.Tokens) _idToToken[t.Id] = t.Content;
        VocabSize = _idToToken.Keys.Max() + 1;
    }

    static JsonElement Prop(JsonElement e, string name) => e.TryGetProperty(name, out var v) ? v : default;

    public static Tokenizer Load(string dir)
    {
        var path = Path.Combine(dir, "tokenizer.json");
        if (!File.Exists(path)) throw new FileNotFoundException($"{dir}: tokenizer.json not found (LoraKit reads the fast-tokenizer file)");
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            return new Tokenizer(doc.RootElement.Clone(), TokenizerConfig.Load(dir));
        }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not valid JSON ({e.Message})"); }
        catch (Exception e) when (e is NotSupportedException or KeyNotFoundException or InvalidOperationException)
        {
            throw new InvalidDataException($"{path}: {e.Message}", e);
        }
    }

    /// <summary>Token ids for <paramref name="text"/>; with <paramref name="addSpecialTokens"/> the post-processor adds BOS etc.</summary>
    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        var ids = new List<int>();
        foreach (var piece in _added.Split(text))
        {
            if (piece.Token is { } tok) { ids.Add(tok.Id); continue; }
            var normalized = _normalize(piece.Text);
            foreach (var word in _preTokenize([normalized], piece.Start == 0))
                if (word.Length > 0) ids.AddRange(_model.Tokenize(word));
        }
        return addSpecialTokens ? _postProcess(ids).ToArray() : ids.ToArray();
    }

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = false)
    {
        var tokens = new List<string>();
        foreach (var id in ids)
        {
            if (!_idToToken.TryGetValue(id, out var tok)) continue; // HF drops ids it does not know
            if (skipSpecialTokens && _added.ById(id) is { Special: true }) continue;
            tokens.Add(tok);
        }
        return string.Concat(_decode(tokens));
    }

    public int? TokenToId(string token) =>
        _added.ByContent(token)?.Id ?? (_model.Vocab.TryGetValue(token, out int id) ? id : null);

    public string? IdToToken(int id) => _idToToken.GetValueOrDefault(id);

    /// <summary>The id of tokenizer_config.json's eos_token, when it names a known token.</summary>
    public int? EosTokenId => Config.EosToken is string e ? TokenToId(e) : null;

    public bool IsSpecial(int id) => _added.ById(id) is { Special: true };
}
