using System.Net;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Classification;
using LoraKit.Server;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// Classification inputs against the contract: data lines (every field × wrong types, unknown labels, empty and huge
/// texts, truncation at every offset, invalid UTF-8), classification adapter files (labels.json, score head, task type)
/// and POST /v1/classify bodies (every field × wrong types, truncation at every offset). Each is a clean error or a
/// correct result, in bounded time; the server never answers 500 and never names its own paths.
/// </summary>
[Collection(GlobalRng.Name)]
public class FuzzClassifyTests : IAsyncLifetime
{
    static readonly Lazy<TextClassifier> Clf = new(() =>
        TextClassifier.Load(Fixtures.Model("qwen2"), TinyClassifiers.Get("qwen2").adapter, ScalarType.Float32, CPU));

    /// <summary>Wrong-typed and hostile JSON values for any field.</summary>
    static readonly (string name, string json)[] Values =
    [
        ("int", "5"), ("negative", "-1"), ("float", "1.5"), ("huge-int", "1e400"), ("bool", "true"), ("null", "null"),
        ("empty-array", "[]"), ("array", "[\"billing\"]"), ("nested-array", "[[1]]"), ("object", "{\"a\":1}"), ("empty-string", "\"\""),
        ("unknown", "\"sales\""), ("space", "\" \""), ("newline", "\"a\\nb\""), ("nul", "\"\\u0000\""), ("lone-surrogate", "\"\\ud800\""),
        ("unicode", "\"réinitialiser 密码 🙂\""), ("label-valid", "\"billing\""), ("long", "\"" + new string('x', 5000) + "\""),
    ];

    OpenAiServer _server = null!;
    HttpClient _http = null!;
    string _root = null!;

    public async Task InitializeAsync()
    {
        _root = Fixtures.TempDir();
        Fixtures.CopyOf(TinyClassifiers.Get("qwen2").adapter, Path.Combine(_root, "clf"));
        Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen2", "a"), Path.Combine(_root, "causal"));
        var broken = Fixtures.CopyOf(TinyClassifiers.Get("qwen2").adapter, Path.Combine(_root, "broken"));
        File.WriteAllText(Path.Combine(broken, AdapterFiles.LabelsFile), "{\"not\": \"a list\"}");
        _server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen2"), Adapters = _root, Port = 0, ApiKey = "k", Device = "cpu", MaxTokens = 8, MaxPromptTokens = 100,
            MaxBodyBytes = 256 << 10, ModelName = "tiny-qwen2",
        });
        _http = new HttpClient { BaseAddress = new Uri(_server.Url) };
        _http.DefaultRequestHeaders.Authorization = new("Bearer", "k");
    }

    public async Task DisposeAsync()
    {
        _http.Dispose();
        await _server.DisposeAsync();
    }

    /// <summary>Whether a wrong-typed value is nevertheless a valid text (null: depends on the tokenizer, either is fine).</summary>
    static bool? TextOk(string vname) => vname switch
    {
        "unicode" or "label-valid" or "newline" or "unknown" => true,
        "nul" or "lone-surrogate" or "long" or "space" => null,
        _ => false,
    };

    /// <summary>Reads, encodes and classifies one data file as `lorakit classify --data` does.</summary>
    static void ClassifyFile(string path)
    {
        var clf = Clf.Value;
        var rows = ClassificationData.Read(path, clf.Labels);
        var preds = clf.ClassifyIds(ClassificationData.Encode(clf, path, rows));
        if (preds.Count != rows.Count) throw new InvalidOperationException("a prediction per row");
    }

    [Fact]
    public void DataLines()
    {
        var dir = Fixtures.TempDir();
        var path = Path.Combine(dir, "data.jsonl");
        int n = 0;
        void Case(string name, byte[] content, bool? mustFail = false)
        {
            File.WriteAllBytes(path, content);
            var e = FuzzContract.Check("classify-data", name, () => ClassifyFile(path));
            n++;
            if (mustFail is bool f && f != (e is not null)) Assert.Fail($"{name}: {(f ? "accepted" : e!.Message)}");
            if (e is not null && !e.Message.StartsWith(path, StringComparison.Ordinal)) Assert.Fail($"{name}: error does not name the file: {e.Message}");
        }
        void Text(string name, string content, bool? mustFail = false) => Case(name, Encoding.UTF8.GetBytes(content), mustFail);

        const string good = "{\"text\": \"refund my payment\", \"label\": \"billing\"}";
        // Every field × every wrong value, as the first line and after a good line.
        foreach (var field in new[] { "text", "label" })
            foreach (var (vname, v) in Values)
            {
                var line = field == "text" ? $"{{\"text\": {v}, \"label\": \"billing\"}}" : $"{{\"text\": \"hello\", \"label\": {v}}}";
                bool? valid = field == "text" ? TextOk(vname) : vname == "label-valid";
                Text($"{field}={vname}", line, mustFail: !valid);
                Text($"{field}={vname} on line 2", good + "\n" + line, mustFail: !valid);
            }
        Text("missing text", "{\"label\": \"billing\"}", true);
        Text("no fields", "{}", true);
        Text("unlabelled", "{\"text\": \"hello\"}");
        Text("mixed labelled/unlabelled", good + "\n{\"text\": \"hello\"}", true);
        Text("mixed unlabelled/labelled", "{\"text\": \"hello\"}\n" + good, true);
        Text("extra fields", "{\"text\": \"hello\", \"label\": \"other\", \"meta\": {\"a\": [1, 2]}}");
        Text("duplicate key", "{\"text\": \"a\", \"text\": \"b\", \"label\": \"other\"}", true);
        Text("duplicate other key", "{\"text\": \"a\", \"x\": 1, \"x\": 2, \"label\": \"other\"}");
        Text("empty file", "", true);
        Text("blank lines only", "\n\n  \n", true);
        foreach (var (vname, v) in Values) Text($"line is {vname}", v, true);
        Text("not JSON", "text,label\nhello,billing", true);
        Text("huge text (chars)", "{\"text\": \"" + new string('a', 300_000) + "\"}", true);
        Text("huge text (tokens)", "{\"text\": \"" + string.Concat(Enumerable.Repeat("word ", 2_000)) + "\"}", true);
        Text("deep nesting", "{\"text\": \"a\", \"x\": " + new string('[', 5000) + new string(']', 5000) + "}", true);
        Case("invalid UTF-8", [.. Encoding.UTF8.GetBytes("{\"text\": \"caf"), 0xC3, 0x28, .. Encoding.UTF8.GetBytes("\"}")], true);
        Case("BOM", [0xEF, 0xBB, 0xBF, .. Encoding.UTF8.GetBytes(good)]);
        // Truncation at every offset of a good line (only the complete line is valid).
        for (int i = 0; i < good.Length; i++) Text($"truncated at {i}", good[..i] + (i == 0 ? "" : "\n"), mustFail: true);
        // Random byte mutations of a good two-line file (more under ./test --fuzz).
        var rng = FuzzContract.Rng("classify-data");
        var bytes = Encoding.UTF8.GetBytes(good + "\n" + good.Replace("billing", "accounts"));
        for (int k = 0; k < 30 * FuzzContract.Scale; k++)
        {
            var b = (byte[])bytes.Clone();
            for (int m = rng.Next(1, 4); m > 0; m--) b[rng.Next(b.Length)] = (byte)rng.Next(256);
            Case($"mutation {k}", b, mustFail: null);
        }
        Assert.True(n > 150, $"{n} cases");
    }

    [Fact]
    public void AdapterFiles_()
    {
        var src = TinyClassifiers.Get("qwen2").adapter;
        int n = 0;
        void Case(string name, Action<string> mutate)
        {
            var dir = Fixtures.CopyOf(src);
            mutate(dir);
            var before = FuzzContract.Snapshot(dir);
            FuzzContract.Check("classify-adapter", name, () =>
            {
                var (labels, score) = SequenceClassifier.ReadHead(dir, 64);
                score.Dispose();
                if (labels.Count != 3) throw new InvalidOperationException($"{labels.Count} labels");
            });
            FuzzContract.AssertUntouched(before, dir, name);
            n++;
        }
        string L(string d) => Path.Combine(d, AdapterFiles.LabelsFile);
        foreach (var (vname, v) in Values) Case($"labels.json = {vname}", d => File.WriteAllText(L(d), v));
        foreach (var (vname, v) in Values) Case($"label entry = {vname}", d => File.WriteAllText(L(d), $"[\"a\", {v}, \"c\"]"));
        Case("labels.json: one label", d => File.WriteAllText(L(d), "[\"a\"]"));
        Case("labels.json: duplicates", d => File.WriteAllText(L(d), "[\"a\", \"a\", \"b\"]"));
        Case("labels.json: too many for the head", d => File.WriteAllText(L(d), JsonSerializer.Serialize(Enumerable.Range(0, 5).Select(i => $"l{i}"))));
        Case("labels.json: 200k labels", d => File.WriteAllText(L(d), JsonSerializer.Serialize(Enumerable.Range(0, 200_000).Select(i => $"l{i}"))));
        Case("labels.json: not JSON", d => File.WriteAllText(L(d), "accounts,billing,other"));
        Case("labels.json missing (PEFT-made: default names)", d => File.Delete(L(d)));
        string text = File.ReadAllText(L(src));
        for (int i = 0; i < text.Length; i++) { int k = i; Case($"labels.json truncated at {k}", d => File.WriteAllText(L(d), text[..k])); }
        // task_type as other strings (wrong JSON types in adapter_config.json are the adapter-config fuzz's: LoraConfig).
        var cfg = File.ReadAllText(Path.Combine(src, AdapterFiles.ConfigFile));
        foreach (var task in new[] { "CAUSAL_LM", "seq_cls", "TOKEN_CLS", "", "SEQ_CLS\n" })
            Case($"task_type = {JsonSerializer.Serialize(task)}", d => File.WriteAllText(Path.Combine(d, AdapterFiles.ConfigFile),
                JsonNode.Parse(cfg)!.AsObject().Also(o => o["task_type"] = task).ToJsonString()));
        // Score head: wrong shape, dtype, non-finite values, extra score tensors, missing.
        foreach (var (name, t) in new (string, Func<TorchSharp.torch.Tensor>)[]
                 {
                     ("shape [3, 63]", () => zeros(3, 63)), ("shape [3]", () => zeros(3)), ("shape [2, 64]", () => zeros(2, 64)),
                     ("NaN", () => full(3, 64, double.NaN)), ("Inf", () => full(3, 64, double.PositiveInfinity)), ("bf16", () => zeros(3, 64, ScalarType.BFloat16)),
                     ("int64", () => zeros(3, 64, ScalarType.Int64)),
                 })
            Case($"score head {name}", d => RewriteWeights(d, w => w[AdapterFiles.ScoreKey] = t()));
        Case("score head missing", d => RewriteWeights(d, w => w.Remove(AdapterFiles.ScoreKey)));
        Case("score bias", d => RewriteWeights(d, w => w["base_model.model.score.bias"] = zeros(3)));
        Assert.True(n > 60, $"{n} cases");
    }

    static void RewriteWeights(string dir, Action<Dictionary<string, TorchSharp.torch.Tensor>> edit)
    {
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        Dictionary<string, TorchSharp.torch.Tensor> w;
        using (var f = SafetensorsFile.Open(path)) w = f.Entries.Keys.ToDictionary(k => k, f.Read);
        edit(w);
        SafetensorsWriter.Save(path, w);
    }

    [Fact]
    public async Task ClassifyBodies()
    {
        int n = 0;
        async Task Case(string name, string body, bool? mustFail)
        {
            HttpStatusCode code = 0;
            string text = "";
            using (var res = await _http.PostAsync("/v1/classify", new StringContent(body, Encoding.UTF8, "application/json")))
            {
                code = res.StatusCode;
                text = await res.Content.ReadAsStringAsync();
            }
            n++;
            FuzzContract.Check("classify-http", name, () =>
            {
                if ((int)code >= 500) throw new Exception($"HTTP {(int)code}: {text}");
                JsonNode? json;
                try { json = JsonNode.Parse(text); }
                catch (JsonException) { throw new Exception($"HTTP {(int)code} with a body that is not JSON: {text}"); }
                if (code == HttpStatusCode.OK)
                {
                    if (json?["data"] is not JsonArray) throw new Exception($"200 without data: {text}");
                    return;
                }
                var message = json?["error"]?["message"]?.GetValue<string>() ?? throw new Exception($"HTTP {(int)code} without an error message: {text}");
                if (message.Contains(_root, StringComparison.Ordinal) || message.Contains(Fixtures.Root, StringComparison.Ordinal))
                    throw new Exception($"the error names a server path: {message}");
                throw new LoraKitException(message); // judged as a clean error: one line, no leaked internals
            });
            if (mustFail == true) Assert.True(code != HttpStatusCode.OK, $"{name}: accepted");
            else if (mustFail == false) Assert.True(code == HttpStatusCode.OK, $"{name}: {(int)code} {text}");
        }

        const string good = "{\"model\": \"clf\", \"input\": [\"refund my payment\", \"hi\"]}";
        await Case("valid", good, false);
        foreach (var (vname, v) in Values)
        {
            await Case($"model={vname}", $"{{\"model\": {v}, \"input\": \"hello\"}}", mustFail: true);
            bool? textOk = TextOk(vname);
            await Case($"input={vname}", $"{{\"model\": \"clf\", \"input\": {v}}}", mustFail: vname == "array" ? false : !textOk);
            await Case($"input=[{vname}]", $"{{\"model\": \"clf\", \"input\": [\"ok\", {v}]}}", mustFail: !textOk);
            await Case($"extra field={vname}", $"{{\"model\": \"clf\", \"input\": \"hello\", \"user\": {v}}}", mustFail: false);
            await Case($"body={vname}", v, mustFail: true);
        }
        foreach (var (name, model) in new[] { ("base", "base"), ("base name", "tiny-qwen2"), ("causal adapter", "causal"), ("unknown", "nope"),
                     ("path", "../clf"), ("absolute", "/etc"), ("broken labels", "broken"), ("dot", "."), ("long", new string('a', 300)) })
            await Case($"model {name}", $"{{\"model\": {JsonSerializer.Serialize(model)}, \"input\": \"hello\"}}", mustFail: true);
        await Case("missing model", "{\"input\": \"hello\"}", true);
        await Case("missing input", "{\"model\": \"clf\"}", true);
        await Case("too many inputs", JsonSerializer.Serialize(new { model = "clf", input = Enumerable.Repeat("a", ClassifyEndpoint.MaxInputs + 1) }), true);
        await Case("max inputs", JsonSerializer.Serialize(new { model = "clf", input = Enumerable.Repeat("hello there", ClassifyEndpoint.MaxInputs) }), false);
        await Case("huge text (chars)", JsonSerializer.Serialize(new { model = "clf", input = new string('a', 200_000) }), true);
        await Case("over the token limit", JsonSerializer.Serialize(new { model = "clf", input = string.Concat(Enumerable.Repeat("word ", 150)) }), true);
        await Case("body over the size limit", JsonSerializer.Serialize(new { model = "clf", input = new string('a', 300_000) }), true);
        await Case("empty body", "", true);
        await Case("deep nesting", "{\"model\": \"clf\", \"input\": " + new string('[', 3000) + new string(']', 3000) + "}", true);
        for (int i = 0; i < good.Length; i++) await Case($"truncated at {i}", good[..i], true);
        var rng = FuzzContract.Rng("classify-http");
        for (int k = 0; k < 20 * FuzzContract.Scale; k++)
        {
            var c = good.ToCharArray();
            for (int m = rng.Next(1, 4); m > 0; m--) c[rng.Next(c.Length)] = (char)rng.Next(32, 127);
            var body = new string(c);
            bool parses = true;
            try { JsonNode.Parse(body); } catch (JsonException) { parses = false; }
            if (parses) continue; // a mutation may still be a valid request; only judge the contract below
            await Case($"mutation {k}", body, true);
        }
        Assert.True(n > 100, $"{n} cases");
    }

    [Fact]
    public void CliCases()
    {
        var adapter = TinyClassifiers.Get("qwen2").adapter;
        var dir = Fixtures.TempDir();
        var data = Path.Combine(dir, "d.jsonl");
        File.WriteAllText(data, "{\"text\": \"hello\", \"label\": 7.5}\n");
        var before = FuzzContract.Snapshot(dir);
        foreach (var (name, args) in new (string, string[])[]
                 {
                     ("bad label type", ["--adapter", adapter, "--data", data]),
                     ("missing data file", ["--adapter", adapter, "--data", Path.Combine(dir, "none.jsonl")]),
                     ("both text and data", ["--adapter", adapter, "--data", data, "--text", "x"]),
                     ("adapter is a file", ["--adapter", data, "--text", "x"]),
                     ("batch size 0", ["--adapter", adapter, "--text", "x", "--batch-size", "0"]),
                 })
        {
            var (code, _, stderr) = CliTests.RunCli(["classify", "--model", Fixtures.Model("qwen2"), "--device", "cpu", .. args]);
            FuzzContract.CheckCli("classify-cli", name, code, stderr);
            Assert.Equal(1, code);
        }
        FuzzContract.AssertUntouched(before, dir, "classify");
    }
}

static class JsonObjectExtensions
{
    public static JsonObject Also(this JsonObject o, Action<JsonObject> f) { f(o); return o; }
}
