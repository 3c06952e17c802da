using System.Text.Json;
using System.Text.RegularExpressions;
using LoraKit.IO;

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

    readonly string _path;

    public TokenizerConfig Config { get; }
    public int VocabSize { get; }

    Tokenizer(JsonElement root, TokenizerConfig config, string path, int? modelVocabSize)
    {
        Config = config;
        _path = path;
        if (root.ValueKind != JsonValueKind.Object) throw new TokenizerFormatException($"the file must hold a JSON object, got {JsonFiles.KindOf(root)}");
        _added = new AddedVocabulary(root.Opt("added_tokens", ""));
        _normalize = Normalizers.Build(root.Opt("normalizer", ""));
        _preTokenize = PreTokenizers.Build(root.Opt("pre_tokenizer", ""));
        _model = new BpeModel(root.Req("model", ""));
        _decode = Decoders.Build(root.Opt("decoder", ""));
        var post = root.Opt("post_processor", "");
        _postProcess = PostProcessor.Build(post);
        _idToToken = new Dictionary<int, string>();
        foreach (var (token, id) in _model.Vocab) _idToToken.TryAdd(id, token);
        foreach (var t in _added.Tokens) _idToToken[t.Id] = t.Content;

        // Every id the tokenizer can produce must index the model's embedding table, or the first forward pass fails
        // deep in libtorch. Without a model config next to it, ids stay below 2^30 (no vocabulary is that large).
        int limit = modelVocabSize ?? (1 << 30);
        string against = modelVocabSize is int v ? $"the model's vocab_size {v} (config.json)" : "any plausible vocabulary size";
        foreach (var t in _added.Tokens)
            if (t.Id >= limit) throw new TokenizerFormatException($"added token '{t.Content}' has id {t.Id}, beyond {against}");
        foreach (var (token, id) in _model.Vocab)
            if (id >= limit) throw new TokenizerFormatException($"token '{token}' has id {id}, beyond {against}");
        foreach (var (name, id) in PostProcessor.SpecialIds(post))
            if (id < 0 || id >= limit || !_idToToken.ContainsKey(id))
                throw new TokenizerFormatException($"post_processor special token '{name}' has id {id}, which is not in the vocabulary");
        VocabSize = _idToToken.Keys.Max() + 1;
    }

    public static Tokenizer Load(string dir)
    {
        ModelDirectory.Require(dir);
        var path = Path.Combine(dir, "tokenizer.json");
        if (!File.Exists(path)) throw new FileNotFoundException($"{dir}: tokenizer.json not found (LoraKit reads the fast-tokenizer file)");
        var config = TokenizerConfig.Load(dir);
        using var doc = JsonFiles.Parse(path);
        try { return new Tokenizer(doc.RootElement, config, path, ModelVocabSize(dir)); }
        catch (Exception e) when (e is TokenizerFormatException or NotSupportedException or InvalidDataException)
        {
            throw new TokenizerFormatException($"{path}: {e.Message}");
        }
    }

    /// <summary>config.json's vocab_size beside the tokenizer, when there is a readable one (its own errors are ModelConfig's to report).</summary>
    static int? ModelVocabSize(string dir)
    {
        var path = Path.Combine(dir, "config.json");
        if (!File.Exists(path)) return null;
        try
        {
            using var doc = JsonFiles.Parse(path);
            return doc.RootElement.ValueKind == JsonValueKind.Object && doc.RootElement.TryGetProperty("vocab_size", out var v)
                && v.TryGetInt32(out int n) && n > 0 ? n : null;
        }
        catch (LoraKitException) { return null; }
    }

    /// <summary>Token ids for <paramref name="text"/>; with <paramref name="addSpecialTokens"/> the post-processor adds BOS etc.</summary>
    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        try { return EncodeCore(text, addSpecialTokens); }
        catch (RegexMatchTimeoutException e)
        {
            throw new LoraKitException($"{_path}: the regex '{Trim(e.Pattern)}' took over {e.MatchTimeout.TotalSeconds:0} s on a " +
                $"{e.Input.Length}-character text (catastrophic backtracking); the tokenizer's pattern must be fixed");
        }
    }

    static string Trim(string s) => s.Length > 200 ? s[..200] + "…" : s;

    int[] EncodeCore(string text, bool addSpecialTokens)
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
