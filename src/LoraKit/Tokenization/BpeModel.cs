using System.Text;
using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>
/// tokenizer.json "model" of type BPE: merges applied lowest-rank-first (leftmost on ties), as HF tokenizers does,
/// with <c>ignore_merges</c> (Llama 3), byte fallback to &lt;0xXX&gt; tokens (Llama 2, Mistral) and unk fusing.
/// </summary>
internal sealed class BpeModel
{
    readonly Dictionary<string, int> _vocab;
    readonly Dictionary<(int, int), (int rank, int id)> _merges = [];
    readonly int? _unkId;
    readonly bool _byteFallback, _fuseUnk, _ignoreMerges;
    readonly int[] _byteIds = new int[256];
    // The server encodes requests on many threads at once: a plain Dictionary written concurrently can corrupt itself.
    readonly System.Collections.Concurrent.ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);

    public IReadOnlyDictionary<string, int> Vocab => _vocab;

    public BpeModel(JsonElement m)
    {
        string type = m.OptStr("type", "model") ?? "BPE";
        if (type != "BPE") throw new NotSupportedException($"unsupported model type '{type}' (only BPE)");
        if (m.TryGetProperty("continuing_subword_prefix", out var csp) && csp.ValueKind == JsonValueKind.String && csp.GetString() != "")
            throw new NotSupportedException("BPE continuing_subword_prefix is not supported");
        if (m.TryGetProperty("end_of_word_suffix", out var eow) && eow.ValueKind == JsonValueKind.String && eow.GetString() != "")
            throw new NotSupportedException("BPE end_of_word_suffix is not supported");

        _vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var p in m.Obj("vocab", "model"))
        {
            int id = p.Value.AsInt($"model.vocab['{p.Name}']");
            if (id < 0) throw new TokenizerFormatException($"'model.vocab' gives token '{p.Name}' the negative id {id}");
            _vocab[p.Name] = id;
        }
        if (_vocab.Count == 0) throw new TokenizerFormatException("'model.vocab' is empty");
        _byteFallback = m.Bool("byte_fallback", "model", false);
        _fuseUnk = m.Bool("fuse_unk", "model", false);
        _ignoreMerges = m.Bool("ignore_merges", "model", false);
        if (m.TryGetProperty("unk_token", out var unk) && unk.ValueKind == JsonValueKind.String && _vocab.TryGetValue(unk.GetString()!, out int u))
            _unkId = u;
        for (int b = 0; b < 256; b++) _byteIds[b] = _vocab.TryGetValue($"<0x{b:X2}>", out int id) ? id : -1;

        int rank = 0;
        foreach (var merge in m.Arr("merges", "model"))
        {
            string a, c;
            if (merge.ValueKind == JsonValueKind.Array)
            {
                if (merge.GetArrayLength() != 2) throw new TokenizerFormatException($"merge {merge.GetRawText()} (number {rank + 1}) must be a pair of tokens");
                a = merge[0].AsStr("model.merges"); c = merge[1].AsStr("model.merges");
            }
            else
            {
                var parts = merge.AsStr("model.merges").Split(' ');
                if (parts.Length != 2) throw new TokenizerFormatException($"malformed merge '{merge.GetString()}' (number {rank + 1})");
                (a, c) = (parts[0], parts[1]);
            }
            if (!_vocab.TryGetValue(a, out int ia) || !_vocab.TryGetValue(c, out int ic) || !_vocab.TryGetValue(a + c, out int inew))
                throw new TokenizerFormatException($"merge '{a} {c}' uses tokens missing from the vocabulary");
            _merges.TryAdd((ia, ic), (rank++, inew));
        }
    }

    public int[] Tokenize(string word)
    {
        if (_cache.TryGetValue(word, out var cached)) return cached;
        int[] ids = _ignoreMerges && _vocab.TryGetValue(word, out int whole) ? [whole] : Merge(word);
        if (_cache.Count < 100_000) _cache[word] = ids;
        return ids;
    }

    int[] Merge(string word)
    {
        // Initial symbols: one per Unicode scalar; unknown ones become byte tokens or unk.
        var symbols = new List<int>();
        bool lastWasUnk = false;
        for (int i = 0; i < word.Length;)
        {
            int len = char.IsSurrogatePair(word, i) ? 2 : 1;
            string ch = word.Substring(i, len);
            i += len;
            if (_vocab.TryGetValue(ch, out int id)) { symbols.Add(id); lastWasUnk = false; continue; }
            if (_byteFallback && Encoding.UTF8.GetBytes(ch).All(b => _byteIds[b] >= 0))
            {
                foreach (var b in Encoding.UTF8.GetBytes(ch)) symbols.Add(_byteIds[b]);
                lastWasUnk = false;
                continue;
            }
            if (_unkId is not int unk) throw new InvalidOperationException($"tokenizer: character '{ch}' is not in the vocabulary and there is no unk_token");
            if (!(_fuseUnk && lastWasUnk)) symbols.Add(unk);
            lastWasUnk = true;
        }

        while (symbols.Count > 1)
        {
            int best = -1, bestRank = int.MaxValue, bestId = 0;
            for (int i = 0; i + 1 < symbols.Count; i++)
                if (_merges.TryGetValue((symbols[i], symbols[i + 1]), out var mr) && mr.rank < bestRank)
                    (best, bestRank, bestId) = (i, mr.rank, mr.id);
            if (best < 0) break;
            symbols[best] = bestId;
            symbols.RemoveAt(best + 1);
        }
        return symbols.ToArray();
    }
}
