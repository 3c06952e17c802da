using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Generation;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// The files of a model directory (safetensors, config.json, tokenizer.json, tokenizer_config.json) mutated
/// systematically: every load either succeeds or fails with one clean line naming the file and the problem (issue 16).
/// </summary>
public class FuzzFilesTests
{
    // ---- helpers ----

    /// <summary>A model directory whose files are symlinks to the fixture's, except those written afterwards.</summary>
    static string LinkedModel(string arch, params string[] except)
    {
        var dir = Fixtures.TempDir();
        foreach (var f in Directory.GetFiles(Fixtures.Model(arch)))
            if (!except.Contains(Path.GetFileName(f)))
                File.CreateSymbolicLink(Path.Combine(dir, Path.GetFileName(f)), f);
        return dir;
    }

    static void WriteJson(string path, JsonNode? node)
    {
        if (File.Exists(path) || new FileInfo(path).LinkTarget != null) File.Delete(path);
        File.WriteAllText(path, node is null ? "null" : node.ToJsonString());
    }

    static JsonNode ReadNode(string path) => JsonNode.Parse(File.ReadAllText(path))!;

    static void LoadModel(string dir)
    {
        using var m = CausalLM.Load(dir, ScalarType.Float32, CPU);
    }

    static void LoadTokenizer(string dir)
    {
        var tok = Tokenizer.Load(dir);
        var ids = tok.Encode("Hello, world! 123 héllo 😀 <|im_start|>x  \n\n", true);
        _ = tok.Decode(ids);
        _ = tok.Decode([0, 1, 2, tok.VocabSize + 5, -1]);
    }

    static Exception Refused(string area, string name, Action act, params string[] fragments)
    {
        var e = FuzzContract.Check(area, name, act);
        Assert.NotNull(e);
        foreach (var f in fragments) Assert.Contains(f, e!.Message);
        return e!;
    }

    // ---- item 16: the Hugging Face cache layout ----

    /// <summary>
    /// snapshots/&lt;rev&gt;/&lt;file&gt; as relative symlinks into blobs/&lt;hash&gt;, as huggingface_hub lays out its cache.
    /// </summary>
    static string HfCacheLayout(string sourceDir)
    {
        var root = Fixtures.TempDir();
        var blobs = Directory.CreateDirectory(Path.Combine(root, "blobs")).FullName;
        var snap = Directory.CreateDirectory(Path.Combine(root, "snapshots", "0123abcd")).FullName;
        foreach (var f in Directory.GetFiles(sourceDir))
        {
            var hash = Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(f))).ToLowerInvariant();
            var blob = Path.Combine(blobs, hash);
            if (!File.Exists(blob)) File.Copy(f, blob);
            File.CreateSymbolicLink(Path.Combine(snap, Path.GetFileName(f)), Path.Combine("..", "..", "blobs", hash));
        }
        return snap;
    }

    [Theory]
    [InlineData("llama")]
    [InlineData("mistral")]
    public void ModelsInTheHuggingFaceCacheLayoutLoad(string arch)
    {
        var snap = HfCacheLayout(Fixtures.Model(arch));
        Assert.NotNull(new FileInfo(Path.Combine(snap, "config.json")).LinkTarget);
        using var m = CausalLM.Load(snap, ScalarType.Float32, CPU);
        Assert.Equal(ModelConfig.Load(Fixtures.Model(arch)).VocabSize, m.Config.VocabSize);
        Assert.NotEmpty(Tokenizer.Load(snap).Encode("hello"));
    }

    [Fact]
    public void AdaptersInTheHuggingFaceCacheLayoutLoad()
    {
        var snap = HfCacheLayout(Fixtures.Path_("adapters", "llama", "a"));
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        var config = AdapterFiles.Load(lm, "a", snap);
        Assert.True(config.R > 0);
    }

    // ---- item 4: tokenizer regexes ----

    [Fact]
    public void CatastrophicPreTokenizerRegexIsAnErrorInSeconds()
    {
        var dir = LinkedModel("llama", "tokenizer.json");
        var tj = ReadNode(Path.Combine(Fixtures.Model("llama"), "tokenizer.json"));
        tj["pre_tokenizer"] = JsonNode.Parse("""{"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": false}""");
        WriteJson(Path.Combine(dir, "tokenizer.json"), tj);
        var tok = Tokenizer.Load(dir);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var e = Refused("tokenizer.json", "(a+)+$ on a*40+!", () => tok.Encode(new string('a', 40) + "!"), "tokenizer.json", "(a+)+$");
        Assert.IsAssignableFrom<LoraKitException>(e);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(8), $"took {sw.Elapsed}");
    }

    [Fact]
    public void InvalidRegexInTokenizerJsonIsNamed()
    {
        var dir = LinkedModel("llama", "tokenizer.json");
        var tj = ReadNode(Path.Combine(Fixtures.Model("llama"), "tokenizer.json"));
        tj["pre_tokenizer"] = JsonNode.Parse("""{"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}""");
        WriteJson(Path.Combine(dir, "tokenizer.json"), tj);
        Refused("tokenizer.json", "invalid regex", () => Tokenizer.Load(dir), "tokenizer.json", "(unclosed");
    }

    // ---- item 9 and 18: config.json values ----

    [Theory]
    [InlineData("rms_norm_eps", "0", "'rms_norm_eps' must be a positive number")]
    [InlineData("rms_norm_eps", "-1e-5", "'rms_norm_eps' must be a positive number")]
    [InlineData("rope_parameters", "{\"rope_theta\": 0, \"rope_type\": \"default\"}", "'rope_theta' must be a positive number")]
    [InlineData("rope_parameters", "5", "'rope_parameters' must be an object")]
    [InlineData("rope_scaling", "\"linear\"", "'rope_scaling' must be an object")]
    [InlineData("eos_token_id", "400", "'eos_token_id' is 400, outside the vocabulary")]
    [InlineData("eos_token_id", "-1", "'eos_token_id' is -1, outside the vocabulary")]
    [InlineData("eos_token_id", "[4, \"x\"]", "'eos_token_id' must be an integer or a list of integers, got a string")]
    [InlineData("bos_token_id", "1000", "'bos_token_id' is 1000, outside the vocabulary")]
    [InlineData("max_position_embeddings", "0", "'max_position_embeddings' must be positive")]
    [InlineData("num_hidden_layers", "-1", "'num_hidden_layers' must be between 1 and")]
    [InlineData("num_hidden_layers", "1000000000", "'num_hidden_layers' must be between 1 and")]
    [InlineData("hidden_act", "5", "field 'hidden_act' must be a string, got a number")]
    [InlineData("model_type", "[]", "field 'model_type' must be a string, got an array")]
    [InlineData("tie_word_embeddings", "\"no\"", "field 'tie_word_embeddings' must be true or false, got a string")]
    [InlineData("hidden_size", "1e30", "'hidden_size' is 1E+30, too large")]
    [InlineData("architectures", "\"LlamaForCausalLM\"", "'architectures' must be a non-empty list")]
    [InlineData("architectures", "[5]", "'architectures' must list class names")]
    public void BadConfigValuesAreNamed(string key, string json, string fragment)
    {
        var dir = LinkedModel("llama", "config.json");
        var c = (JsonObject)ReadNode(Path.Combine(Fixtures.Model("llama"), "config.json"));
        c[key] = JsonNode.Parse(json);
        WriteJson(Path.Combine(dir, "config.json"), c);
        Refused("config.json", $"{key}={json}", () => LoadModel(dir), "config.json", fragment);
    }

    [Fact]
    public void DuplicateKeysInConfigJsonAreAnError()
    {
        var dir = LinkedModel("llama", "config.json");
        var text = File.ReadAllText(Path.Combine(Fixtures.Model("llama"), "config.json"));
        File.WriteAllText(Path.Combine(dir, "config.json"), text.Replace("\"vocab_size\": 400", "\"vocab_size\": 400, \"vocab_size\": 500"));
        Refused("config.json", "duplicate key", () => LoadModel(dir), "config.json", "vocab_size");
    }

    [Fact]
    public void NonFiniteBaseWeightsAreRefusedNamingTheTensor()
    {
        var dir = LinkedModel("llama", "model.safetensors");
        var tensors = new Dictionary<string, Tensor>();
        using (var f = SafetensorsFile.Open(Path.Combine(Fixtures.Model("llama"), "model.safetensors")))
            foreach (var name in f.Entries.Keys) tensors[name] = f.Read(name);
        var victim = "model.layers.1.mlp.down_proj.weight";
        tensors[victim][0, 3] = float.NaN;
        SafetensorsWriter.Save(Path.Combine(dir, "model.safetensors"), tensors);
        foreach (var t in tensors.Values) t.Dispose();
        Refused("safetensors", "NaN in base weights", () => LoadModel(dir), victim, "NaN");
    }

    // ---- item 18: tokenizer files, hub ids, run folders ----

    [Fact]
    public void AddedTokenBeyondTheModelsVocabularyIsNamed()
    {
        var dir = LinkedModel("qwen2", "tokenizer.json");
        var tj = ReadNode(Path.Combine(Fixtures.Model("qwen2"), "tokenizer.json"));
        int vocab = ModelConfig.Load(Fixtures.Model("qwen2")).VocabSize;
        ((JsonArray)tj["added_tokens"]!).Add(JsonNode.Parse($$"""{"id": {{vocab + 7}}, "content": "<|far|>", "special": true}"""));
        WriteJson(Path.Combine(dir, "tokenizer.json"), tj);
        Refused("tokenizer.json", "added token beyond vocab_size", () => Tokenizer.Load(dir), "tokenizer.json", "<|far|>", $"{vocab + 7}", $"vocab_size {vocab}");
    }

    [Fact]
    public void MalformedTokenizerConfigIsReportedAsItself()
    {
        var dir = LinkedModel("qwen2", "tokenizer_config.json");
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), "{\"eos_token\": \"<|im_end|>\",");
        var e = Refused("tokenizer_config.json", "truncated", () => Tokenizer.Load(dir), "tokenizer_config.json");
        Assert.DoesNotContain("tokenizer.json", e.Message.Replace("tokenizer_config.json", ""));
    }

    [Fact]
    public void AHubIdIsNotALocalDirectory()
    {
        Refused("model-dir", "hub id (tokenizer)", () => Tokenizer.Load("Qwen/Qwen2.5-0.5B"), "not a local directory", "lorakit download Qwen/Qwen2.5-0.5B");
        Refused("model-dir", "hub id (model)", () => LoadModel("Qwen/Qwen2.5-0.5B"), "not a local directory");
        // The CLI downloads hub ids (Hub/HubCliTests); offline with an empty cache it says so in one line.
        var (code, _, stderr) = Hub.HubCliTests.RunCli(new() { ["HF_HUB_OFFLINE"] = "1", ["HF_HUB_CACHE"] = Fixtures.TempDir() },
            "score", "--model", "Qwen/Qwen2.5-0.5B", "--text", "hi", "--device", "cpu");
        FuzzContract.CheckCli("model-dir", "cli hub id", code, stderr);
        Assert.Contains("not a local directory, nor found on the hub: Qwen/Qwen2.5-0.5B: not in the hub cache", stderr);
    }

    [Fact]
    public void ARunFolderGivenAsTheAdapterPointsToItsAdapter()
    {
        var run = Fixtures.TempDir();
        Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", "a"), Path.Combine(run, "adapter"));
        File.WriteAllText(Path.Combine(run, "metrics.jsonl"), "");
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        Refused("adapter-dir", "run folder", () => AdapterFiles.Read(lm, run).Dispose(), "training run folder", Path.Combine(run, "adapter"));
    }

    // ---- fuzz: safetensors ----

    static (byte[] bytes, int headerLen, JsonObject header) Fixture(string arch)
    {
        var bytes = File.ReadAllBytes(Path.Combine(Fixtures.Model(arch), "model.safetensors"));
        int headerLen = (int)BitConverter.ToUInt64(bytes, 0);
        var header = (JsonObject)JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, headerLen))!;
        return (bytes, headerLen, header);
    }

    static byte[] WithHeader(string headerJson, ReadOnlySpan<byte> data, ulong? lengthOverride = null)
    {
        var h = Encoding.UTF8.GetBytes(headerJson);
        var result = new byte[8 + h.Length + data.Length];
        BitConverter.GetBytes(lengthOverride ?? (ulong)h.Length).CopyTo(result, 0);
        h.CopyTo(result, 8);
        data.CopyTo(result.AsSpan(8 + h.Length));
        return result;
    }

    static void OpenAndReadAll(string path)
    {
        using var f = SafetensorsFile.Open(path);
        foreach (var name in f.Entries.Keys) f.Read(name).Dispose();
    }

    [Fact]
    public void TruncatedSafetensorsFailCleanly()
    {
        var (bytes, headerLen, header) = Fixture("llama");
        // Every offset of the length prefix and the header, and both sides of each tensor's boundaries in the data.
        var offsets = new SortedSet<int>(Enumerable.Range(0, 8 + headerLen + 1));
        foreach (var (_, v) in header)
            if (v is JsonObject o && o["data_offsets"] is JsonArray off)
                foreach (var x in off)
                    foreach (int d in new[] { -1, 0, 1 })
                        offsets.Add(Math.Clamp(8 + headerLen + (int)x!.GetValue<long>() + d, 0, bytes.Length - 1));
        var dir = Fixtures.TempDir();
        var path = Path.Combine(dir, "model.safetensors");
        int step = FuzzContract.Scale > 1 ? 1 : 3; // every third header byte by default, every byte under --fuzz
        foreach (int cut in offsets.Where(o => o < 8 || o >= 8 + headerLen - 2 || o % step == 0))
        {
            File.WriteAllBytes(path, bytes[..cut]);
            FuzzContract.Check("safetensors", $"truncated at {cut} of {bytes.Length}", () => OpenAndReadAll(path));
        }
    }

    [Fact]
    public void MutatedSafetensorsHeadersFailCleanly()
    {
        var (bytes, headerLen, header) = Fixture("llama");
        var data = bytes.AsSpan(8 + headerLen).ToArray();
        var names = header.Select(kv => kv.Key).Where(k => k != "__metadata__").Order().ToList();
        var r = FuzzContract.Rng("safetensors/header");
        var victims = names.OrderBy(_ => r.Next()).Take(3 * FuzzContract.Scale).ToList();
        var cases = new List<(string name, Func<JsonObject, JsonNode?> mutate, ulong? lengthOverride)>();

        foreach (var t in victims)
        {
            void Field(string what, string field, string json) => cases.Add(($"{t}.{field} = {what}", h => { h[t]![field] = JsonNode.Parse(json); return h; }, null));
            foreach (var dt in new[] { "\"Q4\"", "\"\"", "5", "null", "\"F8_E4M3\"", "\"BOOL\"", "\"I64\"", "\"F64\"" }) Field(dt, "dtype", dt);
            foreach (var sh in new[] { "[-1, 64]", "[9223372036854775807, 9223372036854775807]", "[1e30]", "[\"64\"]", "5", "null", "[]", "[0]", "[64, 64, 64, 64]", "[2.5]" }) Field(sh, "shape", sh);
            foreach (var off in new[] { "[100, 0]", "[0, 0]", "[0]", "[0, 1, 2]", "[-8, 0]", "[0, 99999999999]", "[\"0\", \"8\"]", "null", "{}", "[1.5, 9]" }) Field(off, "data_offsets", off);
            cases.Add(($"{t} removed", h => { h.Remove(t); return h; }, null));
            cases.Add(($"{t} = 5", h => { h[t] = 5; return h; }, null));
            cases.Add(($"{t} overlaps first", h =>
            {
                var first = (JsonArray)h[names[0]]!["data_offsets"]!;
                h[t]!["data_offsets"] = first.DeepClone();
                return h;
            }, null));
        }
        foreach (var meta in new[] { "5", "[]", "null", "{\"a\": 5}", "{\"a\": {\"b\": \"c\"}}", "\"x\"" })
            cases.Add(($"__metadata__ = {meta}", h => { h["__metadata__"] = JsonNode.Parse(meta); return h; }, null));
        foreach (var root in new[] { "[]", "5", "\"x\"", "null", "{}" })
            cases.Add(($"header = {root}", _ => JsonNode.Parse(root), null));
        foreach (var len in new ulong[] { 0, 1, 7, ulong.MaxValue, (ulong)long.MaxValue + 1, 100_000_001, (ulong)(headerLen + data.Length + 1) })
            cases.Add(($"header length {len}", h => h, len));
        cases.Add(("duplicate tensor name", h => h, null)); // patched below

        var dir = Fixtures.TempDir();
        var path = Path.Combine(dir, "model.safetensors");
        foreach (var (name, mutate, lengthOverride) in cases)
        {
            var h = (JsonObject)header.DeepClone();
            var json = mutate(h)?.ToJsonString() ?? "null";
            if (name == "duplicate tensor name")
                json = json.TrimEnd('}') + $",\"{names[0]}\":" + header[names[0]]!.ToJsonString() + "}";
            File.WriteAllBytes(path, WithHeader(json, data, lengthOverride));
            FuzzContract.Check("safetensors", name, () => OpenAndReadAll(path));
        }

        // Whole-model loads through mutated weights: shape/dtype changes must be named, not crash the build of the model.
        var modelDir = LinkedModel("llama", "model.safetensors");
        var mpath = Path.Combine(modelDir, "model.safetensors");
        foreach (var (name, mutate, lengthOverride) in cases.Where((_, i) => i % (FuzzContract.Scale > 1 ? 1 : 4) == 0))
        {
            var h = (JsonObject)header.DeepClone();
            File.WriteAllBytes(mpath, WithHeader(mutate(h)?.ToJsonString() ?? "null", data, lengthOverride));
            FuzzContract.Check("safetensors", $"model load: {name}", () => LoadModel(modelDir));
        }
    }

    [Fact]
    public void MutatedShardIndexAndGenerationConfigFailCleanly()
    {
        var dir = LinkedModel("mistral", "model.safetensors.index.json", "generation_config.json");
        var index = ReadNode(Path.Combine(Fixtures.Model("mistral"), "model.safetensors.index.json"));
        var firstKey = ((JsonObject)index["weight_map"]!).First().Key;
        var indexCases = new (string what, Func<JsonNode, string> edit)[]
        {
            ("weight_map missing", n => { ((JsonObject)n).Remove("weight_map"); return n.ToJsonString(); }),
            ("weight_map = []", n => { n["weight_map"] = new JsonArray(); return n.ToJsonString(); }),
            ("shard = 5", n => { n["weight_map"]![firstKey] = 5; return n.ToJsonString(); }),
            ("shard = ''", n => { n["weight_map"]![firstKey] = ""; return n.ToJsonString(); }),
            ("shard = ../x", n => { n["weight_map"]![firstKey] = "../config.json"; return n.ToJsonString(); }),
            ("shard missing", n => { n["weight_map"]![firstKey] = "model-99999-of-00006.safetensors"; return n.ToJsonString(); }),
            ("shard = config.json", n => { n["weight_map"]![firstKey] = "config.json"; return n.ToJsonString(); }),
            ("tensor listed in the wrong shard", n => { n["weight_map"]![firstKey] = "model-00006-of-00006.safetensors"; return n.ToJsonString(); }),
            ("extra tensor", n => { n["weight_map"]!["model.extra.weight"] = "model-00001-of-00006.safetensors"; return n.ToJsonString(); }),
            ("root = []", _ => "[]"),
            ("truncated", n => n.ToJsonString()[..40]),
            ("duplicate key", n => n.ToJsonString().Replace("\"weight_map\":{", $"\"weight_map\":{{\"{firstKey}\":\"x\",")),
        };
        var gen = ReadNode(Path.Combine(Fixtures.Model("mistral"), "generation_config.json"));
        File.WriteAllText(Path.Combine(dir, "generation_config.json"), gen.ToJsonString());
        foreach (var (what, edit) in indexCases)
        {
            File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), edit(index.DeepClone()));
            FuzzContract.Check("safetensors-index", what, () => LoadModel(dir));
        }
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), index.ToJsonString());
        var config = ModelConfig.Load(dir);
        foreach (var eos in new[] { "-1", "99999", "\"x\"", "[1, \"x\"]", "[1, 2.5]", "null", "{}", "1e30" })
        {
            var g = gen.DeepClone();
            g["eos_token_id"] = JsonNode.Parse(eos);
            File.WriteAllText(Path.Combine(dir, "generation_config.json"), g.ToJsonString());
            FuzzContract.Check("generation_config.json", $"eos_token_id = {eos}", () => StopTokens.EosTokenIds(config, null, dir));
        }
        foreach (var bad in new[] { "", "[", "[]", "{\"eos_token_id\": 1, \"eos_token_id\": 2}" })
        {
            File.WriteAllText(Path.Combine(dir, "generation_config.json"), bad);
            FuzzContract.Check("generation_config.json", $"file = {bad}", () => StopTokens.EosTokenIds(config, null, dir));
        }
    }

    // ---- fuzz: config.json ----

    static readonly (string name, Func<JsonNode?, JsonNode?> make)[] ValueMutations =
    [
        ("null", _ => null), ("string", _ => "x"), ("true", _ => true), ("array", _ => new JsonArray(1, 2)), ("object", _ => new JsonObject { ["a"] = 1 }),
        ("-1", _ => -1), ("0", _ => 0), ("huge", _ => 1e30), ("int max", _ => int.MaxValue), ("NaN string", _ => "NaN"), ("1.5", _ => 1.5),
        ("same as string", v => v is JsonValue jv ? jv.ToJsonString().Trim('"') : "[]"), ("2^31", _ => 2147483648L),
    ];

    [Theory]
    [InlineData("llama")]
    [InlineData("mistral")]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    public void EveryConfigFieldMutatedLoadsOrFailsCleanly(string arch)
    {
        var original = (JsonObject)ReadNode(Path.Combine(Fixtures.Model(arch), "config.json"));
        var dir = LinkedModel(arch, "config.json");
        var path = Path.Combine(dir, "config.json");
        var paths = original.Select(kv => new[] { kv.Key })
            .Concat(original.Where(kv => kv.Value is JsonObject).SelectMany(kv => ((JsonObject)kv.Value!).Select(c => new[] { kv.Key, c.Key })))
            .ToList();
        int n = 0, fieldIndex = 0;
        foreach (var p in paths)
        {
            // Every field gets every mutation under --fuzz; by default a third of them, rotating so each mutation still
            // meets every kind of field across the four architectures.
            int offset = fieldIndex++;
            var cases = ValueMutations.Where((_, i) => FuzzContract.Scale > 1 || (i + offset) % 3 == 0)
                .Select(m => (m.name, (Action<JsonObject>)(c => Parent(c, p)[p[^1]] = m.make(Parent(original, p)[p[^1]]?.DeepClone()))))
                .Append(("deleted", c => Parent(c, p).Remove(p[^1])));
            foreach (var (mname, apply) in cases)
            {
                var c = (JsonObject)original.DeepClone();
                apply(c);
                WriteJson(path, c);
                FuzzContract.Check("config.json", $"{arch}: {string.Join(".", p)} {mname}", () => LoadModel(dir));
                n++;
            }
        }
        // Whole-file damage: truncation at a sample of offsets, duplicate keys, a non-object root.
        var text = original.ToJsonString();
        foreach (int cut in Enumerable.Range(0, text.Length).Where(i => i % Math.Max(1, 40 / FuzzContract.Scale) == 0))
        {
            File.Delete(path);
            File.WriteAllText(path, text[..cut]);
            FuzzContract.Check("config.json", $"{arch}: truncated at {cut}", () => LoadModel(dir));
        }
        foreach (var bad in new[] { "[]", "5", "null", "\"x\"", "", "\uFEFF{}", text.Insert(1, "\"vocab_size\": 1,") })
        {
            File.Delete(path);
            File.WriteAllText(path, bad);
            FuzzContract.Check("config.json", $"{arch}: file = {bad[..Math.Min(bad.Length, 30)]}", () => LoadModel(dir));
        }
        Assert.True(n > 60);
    }

    static JsonObject Parent(JsonObject root, string[] path) => path.Length == 1 ? root : (JsonObject)root[path[0]]!;

    // ---- fuzz: tokenizer.json and tokenizer_config.json ----

    /// <summary>Paths into a JSON tree; big containers (vocab, merges, added tokens) contribute only their first entries.</summary>
    static IEnumerable<List<object>> NodePaths(JsonNode? n, List<object> prefix)
    {
        switch (n)
        {
            case JsonObject o:
                foreach (var (k, v) in o.Take(3 + 12 / (o.Count > 20 ? 4 : 1) * FuzzContract.Scale).ToList())
                {
                    var p = new List<object>(prefix) { k };
                    yield return p;
                    foreach (var sub in NodePaths(v, p)) yield return sub;
                }
                break;
            case JsonArray a:
                for (int i = 0; i < Math.Min(a.Count, a.Count > 20 ? 2 * FuzzContract.Scale : 6); i++)
                {
                    var p = new List<object>(prefix) { i };
                    yield return p;
                    foreach (var sub in NodePaths(a[i], p)) yield return sub;
                }
                break;
        }
    }

    static void Set(JsonNode root, List<object> path, JsonNode? value, bool delete)
    {
        var parent = root;
        foreach (var k in path.Take(path.Count - 1)) parent = k is string s ? parent[s]! : parent[(int)k]!;
        switch (parent, path[^1])
        {
            case (JsonObject o, string key): if (delete) o.Remove(key); else o[key] = value; break;
            case (JsonArray a, int i): if (delete) a.RemoveAt(i); else a[i] = value; break;
        }
    }

    static JsonNode? Get(JsonNode root, List<object> path)
    {
        JsonNode? n = root;
        foreach (var k in path) n = k is string s ? n![s] : n![(int)k];
        return n;
    }

    [Theory]
    [InlineData("llama3")]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    [InlineData("llama2")]
    [InlineData("metaspace")]
    [InlineData("gpt2")]
    public void EveryTokenizerFieldMutatedLoadsOrFailsCleanly(string name)
    {
        var src = Fixtures.Path_("tokenizers", name);
        var dir = Fixtures.TempDir();
        File.CreateSymbolicLink(Path.Combine(dir, "tokenizer_config.json"), Path.Combine(src, "tokenizer_config.json"));
        var path = Path.Combine(dir, "tokenizer.json");
        var original = ReadNode(Path.Combine(src, "tokenizer.json"));
        var r = FuzzContract.Rng("tokenizer/" + name);
        int n = 0;
        foreach (var p in NodePaths(original, []).ToList())
        {
            var muts = ValueMutations.OrderBy(_ => r.Next()).Take(3 * FuzzContract.Scale).ToList();
            foreach (var (mname, make) in muts.Select(m => (m.name, (Func<JsonNode?, JsonNode?>)m.make)).Append(("deleted", _ => null)))
            {
                var t = original.DeepClone();
                Set(t, p, make(Get(original, p)?.DeepClone()), mname == "deleted");
                File.WriteAllText(path, t.ToJsonString());
                FuzzContract.Check("tokenizer.json", $"{name}: {string.Join(".", p)} {mname}", () => LoadTokenizer(dir));
                n++;
            }
        }
        // Patterns, merges and ids that parse but are wrong.
        var specials = new (string what, Action<JsonNode> edit)[]
        {
            ("regex (a+)+$", t => t["pre_tokenizer"] = JsonNode.Parse("""{"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated"}""")),
            ("regex [", t => t["pre_tokenizer"] = JsonNode.Parse("""{"type": "Split", "pattern": {"Regex": "["}, "behavior": "Isolated"}""")),
            ("regex (?<=a+)b", t => t["pre_tokenizer"] = JsonNode.Parse("""{"type": "Split", "pattern": {"Regex": "(?<=a+)b"}, "behavior": "Removed"}""")),
            ("empty split string", t => t["pre_tokenizer"] = JsonNode.Parse("""{"type": "Split", "pattern": {"String": ""}, "behavior": "Contiguous"}""")),
            ("bad behavior", t => t["pre_tokenizer"] = JsonNode.Parse("""{"type": "Split", "pattern": {"String": " "}, "behavior": "Sideways"}""")),
            ("normalizer regex", t => t["normalizer"] = JsonNode.Parse("""{"type": "Replace", "pattern": {"Regex": "(x+x+)+y"}, "content": ""}""")),
            ("merge of unknown tokens", t => ((JsonArray)t["model"]!["merges"]!).Add("zzzq qqqz")),
            ("merge with three parts", t => ((JsonArray)t["model"]!["merges"]!).Add("a b c")),
            ("merge pair array of 1", t => ((JsonArray)t["model"]!["merges"]!).Add(new JsonArray("a"))),
            ("vocab id negative", t => t["model"]!["vocab"]!["zz-new"] = -5),
            ("vocab id 2^31-1", t => t["model"]!["vocab"]!["zz-new"] = int.MaxValue),
            ("vocab empty", t => t["model"]!["vocab"] = new JsonObject()),
            ("added id huge", t => ((JsonArray)t["added_tokens"]!).Add(JsonNode.Parse("""{"id": 2000000000, "content": "<big>"}"""))),
            ("added empty content", t => ((JsonArray)t["added_tokens"]!).Add(JsonNode.Parse("""{"id": 3, "content": ""}"""))),
            ("post_processor unknown special", t => t["post_processor"] = JsonNode.Parse("""{"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}}""")),
            ("post_processor id beyond vocab", t => t["post_processor"] = JsonNode.Parse("""{"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [99999], "tokens": ["<s>"]}}}""")),
            ("unknown model type", t => t["model"]!["type"] = "WordPiece"),
            ("strip decoder empty content", t => t["decoder"] = JsonNode.Parse("""{"type": "Strip", "content": "", "start": 1, "stop": 0}""")),
            ("root array", t => { }),
        };
        foreach (var (what, edit) in specials)
        {
            var t = original.DeepClone();
            edit(t);
            File.WriteAllText(path, what == "root array" ? "[]" : t.ToJsonString());
            FuzzContract.Check("tokenizer.json", $"{name}: {what}", () => LoadTokenizer(dir));
        }
        var text = original.ToJsonString();
        foreach (int cut in Enumerable.Range(0, 12 * FuzzContract.Scale).Select(_ => r.Next(text.Length)))
        {
            File.WriteAllText(path, text[..cut]);
            FuzzContract.Check("tokenizer.json", $"{name}: truncated at {cut}", () => LoadTokenizer(dir));
        }
        Assert.True(n > 50);
    }

    [Theory]
    [InlineData("qwen2")]
    [InlineData("llama")]
    public void EveryTokenizerConfigFieldMutatedLoadsOrFailsCleanly(string arch)
    {
        var src = Fixtures.Model(arch);
        var dir = LinkedModel(arch, "tokenizer_config.json");
        var path = Path.Combine(dir, "tokenizer_config.json");
        var original = ReadNode(Path.Combine(src, "tokenizer_config.json"));
        foreach (var p in NodePaths(original, []).Where(p => p.Count <= 3).ToList())
            foreach (var (mname, make) in ValueMutations.Select(m => (m.name, m.make)).Append(("deleted", _ => null)))
            {
                var t = original.DeepClone();
                Set(t, p, make(Get(original, p)?.DeepClone()), mname == "deleted");
                File.WriteAllText(path, t.ToJsonString());
                FuzzContract.Check("tokenizer_config.json", $"{arch}: {string.Join(".", p)} {mname}", () =>
                {
                    var tok = Tokenizer.Load(dir);
                    if (tok.Config.ChatTemplate is string ct)
                        new Tokenization.ChatTemplate(ct).Render([new ChatTurn("user", "hi")], true, tok.Config);
                });
            }
        var text = original.ToJsonString();
        foreach (int cut in Enumerable.Range(0, text.Length).Where(i => i % Math.Max(1, 64 / FuzzContract.Scale) == 0))
        {
            File.WriteAllText(path, text[..cut]);
            FuzzContract.Check("tokenizer_config.json", $"{arch}: truncated at {cut}", () => Tokenizer.Load(dir));
        }
    }
}
