using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LoraKit.IO;

namespace LoraKit.Export;

/// <summary>
/// A Hugging Face tokenizer.json (+ tokenizer_config.json) in GGUF form, as convert_hf_to_gguf.py writes it:
/// <list type="bullet">
/// <item>byte-level BPE (Llama 3, Qwen): <c>tokenizer.ggml.model = gpt2</c> with <c>tokens</c>, <c>token_type</c>,
/// <c>merges</c> and <c>pre</c>, the pre-tokenizer llama.cpp should split with. convert_hf_to_gguf.py tells the
/// pre-tokenizer by hashing how the tokenizer splits a test text, which needs the real vocabulary; here it is read
/// from the Split regex itself (Llama 3's regex → <c>llama-bpe</c>, Qwen2's → <c>qwen2</c>, plain GPT-2 → <c>gpt-2</c>).</item>
/// <item>SentencePiece-style BPE with byte fallback (Mistral, Llama 2, Phi-3): <c>tokenizer.ggml.model = llama</c>
/// with <c>scores</c>; llama.cpp merges the pair whose result scores highest, so a merged piece scores −id (BPE
/// vocabularies number pieces in merge order, as SentencePiece's own BPE scores do).</item>
/// </list>
/// Token types are llama.cpp's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused (padding ids beyond the
/// tokenizer), 6 byte (<c>&lt;0xAB&gt;</c>).
/// </summary>
public static class GgufVocab
{
    const int Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, ByteToken = 6;

    const string Llama3Regex = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const string Qwen2Regex = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// <summary>Writes the <c>tokenizer.*</c> keys for the tokenizer in <paramref name="modelDir"/> (ids up to <paramref name="vocabSize"/>).</summary>
    public static void Write(GgufWriter w, string modelDir, int vocabSize, JsonObject modelConfig)
    {
        var path = Path.Combine(modelDir, "tokenizer.json");
        if (!File.Exists(path)) throw new GgufExportException($"{path}: not found (a GGUF file carries its tokenizer)");
        _ = Tokenization.Tokenizer.Load(modelDir); // LoraKit's own checks first: a malformed file fails in one line naming the field
        var json = JsonFiles.ParseNode(path) as JsonObject ?? throw new GgufExportException($"{path}: not a JSON object");
        var tokConfigPath = Path.Combine(modelDir, "tokenizer_config.json");
        var tokConfig = File.Exists(tokConfigPath) ? JsonFiles.ParseNode(tokConfigPath) as JsonObject ?? new JsonObject() : new JsonObject();

        var model = json["model"] as JsonObject ?? throw new GgufExportException($"{path}: no 'model'");
        if ((string?)model["type"] != "BPE")
            throw new GgufExportException($"{path}: tokenizer model '{(string?)model["type"]}' cannot be exported to GGUF (only BPE)");
        var tokens = Tokens(json, model, vocabSize, path);
        bool byteLevel = Mentions(json["pre_tokenizer"], "ByteLevel");
        bool spm = !byteLevel && (bool?)model["byte_fallback"] == true && tokens.Text.Any(t => t == "<0x0A>");
        if (byteLevel) WriteByteLevel(w, json, model, tokens, path);
        else if (spm) WriteSentencePiece(w, json, tokens);
        else throw new GgufExportException($"{path}: a BPE tokenizer that is neither byte-level nor SentencePiece-style with byte fallback cannot be exported to GGUF");

        WriteSpecials(w, tokConfig, modelConfig, tokens, json);
        if (tokConfig["chat_template"] is JsonValue tpl && tpl.TryGetValue<string>(out var template)) w.Add("tokenizer.chat_template", template);
    }

    sealed record TokenTable(string[] Text, int[] Type, Dictionary<string, int> Ids);

    /// <summary>Every id below <paramref name="vocabSize"/>: vocabulary pieces, added tokens, then padding for ids neither names.</summary>
    static TokenTable Tokens(JsonObject json, JsonObject model, int vocabSize, string path)
    {
        var vocab = model["vocab"] as JsonObject ?? throw new GgufExportException($"{path}: model.vocab is not an object");
        var added = (json["added_tokens"] as JsonArray ?? []).OfType<JsonObject>().ToList();
        int size = Math.Max(vocabSize, vocab.Select(kv => (int)kv.Value! + 1).Concat(added.Select(a => (int)a["id"]! + 1)).DefaultIfEmpty(0).Max());
        if (size > vocabSize)
            throw new GgufExportException($"{path}: token ids reach {size - 1}, beyond the model's vocab_size {vocabSize}");
        var text = new string[size];
        var type = new int[size];
        foreach (var (piece, id) in vocab) { text[(int)id!] = piece; type[(int)id!] = Normal; }
        string? unk = (string?)model["unk_token"];
        foreach (var a in added)
        {
            int id = (int)a["id"]!;
            text[id] = (string)a["content"]!;
            type[id] = (bool?)a["special"] == true ? Control : UserDefined;
        }
        for (int i = 0; i < size; i++)
        {
            if (text[i] is null) { text[i] = $"[PAD{i}]"; type[i] = Unused; }
            else if (text[i] == unk) type[i] = Unknown;
        }
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < size; i++) ids.TryAdd(text[i], i);
        return new TokenTable(text, type, ids);
    }

    static void WriteByteLevel(GgufWriter w, JsonObject json, JsonObject model, TokenTable t, string path)
    {
        w.Add("tokenizer.ggml.model", "gpt2");
        w.Add("tokenizer.ggml.pre", PreTokenizer(json["pre_tokenizer"], path));
        w.Add("tokenizer.ggml.tokens", t.Text);
        w.Add("tokenizer.ggml.token_type", t.Type);
        var merges = (model["merges"] as JsonArray ?? []).Select(m => m switch
        {
            JsonArray pair => $"{(string)pair[0]!} {(string)pair[1]!}",
            _ => (string)m!,
        }).ToList();
        w.Add("tokenizer.ggml.merges", merges);
    }

    static void WriteSentencePiece(GgufWriter w, JsonObject json, TokenTable t)
    {
        w.Add("tokenizer.ggml.model", "llama");
        var types = t.Type.Select((ty, i) => ty == Normal && Regex.IsMatch(t.Text[i], "^<0x[0-9A-Fa-f]{2}>$") ? ByteToken : ty).ToArray();
        var scores = types.Select((ty, i) => ty == Normal ? -(float)i : 0f).ToArray();
        w.Add("tokenizer.ggml.tokens", t.Text);
        w.Add("tokenizer.ggml.scores", scores);
        w.Add("tokenizer.ggml.token_type", types);
        // SentencePiece's "▁" prefix on the first word: tokenizer.json spells it as a Prepend normalizer.
        w.Add("tokenizer.ggml.add_space_prefix", Mentions(json["normalizer"], "Prepend"));
    }

    /// <summary>The llama.cpp pre-tokenizer for a byte-level BPE's Split regex.</summary>
    static string PreTokenizer(JsonNode? pre, string path)
    {
        var regexes = Find(pre, "Split").Select(s => (string?)s["pattern"]?["Regex"]).Where(r => r is not null).ToList();
        if (regexes.Count == 0 && Find(pre, "ByteLevel").Any(b => (bool?)b["use_regex"] != false)) return "gpt-2";
        if (regexes.Count == 1 && regexes[0] == Llama3Regex) return "llama-bpe";
        if (regexes.Count == 1 && regexes[0] == Qwen2Regex) return "qwen2";
        throw new GgufExportException($"{path}: pre-tokenizer split regex is not one llama.cpp is known to share (Llama 3, Qwen2, GPT-2); cannot choose tokenizer.ggml.pre");
    }

    /// <summary>bos/eos/unk/pad ids from tokenizer_config.json (as transformers resolves them), else config.json's ids; add_bos/add_eos.</summary>
    static void WriteSpecials(GgufWriter w, JsonObject tokConfig, JsonObject modelConfig, TokenTable t, JsonObject json)
    {
        int? Id(string name)
        {
            var node = tokConfig[$"{name}_token"];
            string? text = node is JsonObject o ? (string?)o["content"] : node is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
            if (text is not null && t.Ids.TryGetValue(text, out int id)) return id;
            var fromConfig = modelConfig[$"{name}_token_id"];
            if (fromConfig is JsonArray arr) fromConfig = arr.FirstOrDefault();
            return fromConfig is JsonValue cv && cv.TryGetValue<int>(out int cid) ? cid : null;
        }
        int? bos = Id("bos");
        foreach (var name in new[] { "bos", "eos", "unk", "pad" })
            if (Id(name) is int id) w.Add($"tokenizer.ggml.{name}_token_id", (uint)id);
        var template = Find(json["post_processor"], "TemplateProcessing").FirstOrDefault()?["single"] as JsonArray;
        bool addBos = (bool?)tokConfig["add_bos_token"] ?? (bos is int b && template?.FirstOrDefault()?["SpecialToken"]?["id"] is JsonValue first
            && t.Ids.TryGetValue((string)first!, out int fid) && fid == b);
        bool addEos = (bool?)tokConfig["add_eos_token"] ?? template?.LastOrDefault()?["SpecialToken"] is not null;
        w.Add("tokenizer.ggml.add_bos_token", addBos);
        w.Add("tokenizer.ggml.add_eos_token", addEos);
    }

    static bool Mentions(JsonNode? node, string type) => Find(node, type).Any();

    /// <summary>Every object of <paramref name="type"/> in a (possibly nested Sequence) pre-tokenizer/normalizer/processor tree.</summary>
    static IEnumerable<JsonObject> Find(JsonNode? node, string type)
    {
        switch (node)
        {
            case JsonObject o:
                if ((string?)o["type"] == type) yield return o;
                foreach (var (_, child) in o)
                    if (child is JsonArray or JsonObject) foreach (var f in Find(child, type)) yield return f;
                break;
            case JsonArray a:
                foreach (var child in a) foreach (var f in Find(child, type)) yield return f;
                break;
        }
    }
}
