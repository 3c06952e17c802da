using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Classification;
using LoraKit.Server;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// Tiny sequence-classification adapters trained in-process once per test run (a few steps, LoRA dropout on so eval
/// mode matters): qwen2 has a pad token (pooling skips trailing pads), llama has none (pooling takes the last token).
/// </summary>
public static class TinyClassifiers
{
    static readonly string[] Pre = ["", "hi, ", "please: ", "urgent: ", "hello, "], Post = ["", " thanks", " today", " please"];
    static readonly Dictionary<string, string[]> Phrases = new()
    {
        ["accounts"] = ["reset my password", "change my email"], ["billing"] = ["my invoice is wrong", "refund my payment"],
        ["other"] = ["what time is it", "tell me a joke"],
    };

    public static readonly IReadOnlyList<(string text, string label)> All =
        (from kv in Phrases from ph in kv.Value from p in Pre from q in Post select (p + ph + q, kv.Key)).ToList();

    static readonly Dictionary<string, Lazy<(string adapter, string valid)>> Runs = new()
    {
        ["qwen2"] = new(() => Train("qwen2", 12)), ["llama"] = new(() => Train("llama", 4)),
    };

    /// <summary>The adapter directory and a labelled validation file for <paramref name="arch"/>.</summary>
    public static (string adapter, string valid) Get(string arch) => Runs[arch].Value;

    public static string Write(string path, IEnumerable<(string text, string label)> rows)
    {
        File.WriteAllLines(path, rows.Select(r => JsonSerializer.Serialize(new { text = r.text, label = r.label })));
        return path;
    }

    static (string, string) Train(string arch, int steps)
    {
        var dir = Fixtures.TempDir();
        var train = Write(Path.Combine(dir, "train.jsonl"), All.Where((_, i) => i % 4 != 0));
        var valid = Write(Path.Combine(dir, "valid.jsonl"), All.Where((_, i) => i % 4 == 0));
        var c = new TrainConfig
        {
            Model = Fixtures.Model(arch), Data = train, Output = Path.Combine(dir, "run"), R = 4, LoraAlpha = 8, LoraDropout = 0.1,
            Lr = 2e-2, BatchSize = 8, Steps = steps, Device = "cpu", Schedule = "constant", Seed = 3,
        };
        var r = Trainer.Run(c, false, new ListLog());
        return (r.AdapterDir, valid);
    }
}

[Collection(GlobalRng.Name)]
public class ClassifyTests
{
    static TextClassifier Load(string arch, string? adapter = null) =>
        TextClassifier.Load(Fixtures.Model(arch), adapter ?? TinyClassifiers.Get(arch).adapter, ScalarType.Float32, CPU);

    static Tensor Logits(IEnumerable<Prediction> cs) => stack(cs.Select(c => tensor(c.Logits)).ToArray());

    /// <summary>
    /// The classifier's logits, computed independently: a fresh base, the adapter's LoRA weights, one unpadded row at a
    /// time through the decoder, transformers' pooling written out (last token, skipping trailing pad tokens), the head.
    /// </summary>
    static Tensor Reference(string arch, IReadOnlyList<string> texts)
    {
        var adapter = TinyClassifiers.Get(arch).adapter;
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU));
        AdapterFiles.Load(lm, "default", adapter, new AdapterLoadOptions { SequenceClassification = true });
        lm.Model.eval();
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        int? pad = tok.Config.PadToken is string p ? tok.TokenToId(p) : lm.Model.Config.PadTokenId;
        using var f = SafetensorsFile.Open(Path.Combine(adapter, AdapterFiles.WeightsFile));
        using var score = f.Read(AdapterFiles.ScoreKey).to(ScalarType.Float32);
        using var _ = no_grad();
        var rows = new List<Tensor>();
        foreach (var t in texts)
        {
            var ids = tok.Encode(t);
            int last = ids.Length - 1;
            while (pad is int pd && last > 0 && ids[last] == pd) last--;
            var h = lm.Model.model.Forward(tensor(ids.Select(x => (long)x).ToArray()).unsqueeze(0), null, null);
            rows.Add(nn.functional.linear(h[0, last], score));
        }
        return stack(rows.ToArray());
    }

    [Theory]
    [InlineData("qwen2")]
    [InlineData("llama")]
    public void LibraryClassifiesAsTheModelsOwnForwardBatchedAndDeterministic(string arch)
    {
        var texts = TinyClassifiers.All.Select(x => x.text).Where((_, i) => i % 5 == 0).ToList();
        using var clf = Load(arch);
        Assert.False(clf.Model.training); // eval mode: LoRA dropout (0.1 here) off
        var batched = clf.Classify(texts, batchSize: 4);
        var again = clf.Classify(texts, batchSize: 4);
        var single = clf.Classify(texts, batchSize: 1);
        var reference = Reference(arch, texts);
        Assert.True(Close.RelError(Logits(batched), reference) <= 1e-4, $"batched vs reference {Close.RelError(Logits(batched), reference):E2}");
        Assert.True(Close.RelError(Logits(single), reference) <= 1e-4, $"single vs reference {Close.RelError(Logits(single), reference):E2}");
        Assert.True(Logits(again).equal(Logits(batched)).all().item<bool>(), "two runs differ (dropout at inference?)");
        foreach (var c in batched)
        {
            Assert.Equal(clf.Labels, c.Probabilities.Keys);
            Assert.Equal(1.0, c.Probabilities.Values.Sum(), 5);
            Assert.Equal(c.Label, c.Probabilities.MaxBy(kv => kv.Value).Key);
        }
    }

    [Fact]
    public void AccuracyOnLabelledDataEqualsTheTrainingTimeEvaluation()
    {
        var (adapter, valid) = TinyClassifiers.Get("qwen2");
        using var clf = Load("qwen2");
        var rows = ClassificationData.Read(valid, clf.Labels);
        var predictions = clf.ClassifyIds(ClassificationData.Encode(clf, valid, rows), 8);
        var report = ClassificationReport.Of(clf.Labels, rows.Select(r => r.Label!.Value).ToList(), predictions.Select(p => clf.Labels.ToList().IndexOf(p.Label)).ToList());

        // The trainer's own evaluation path (JsonlDataset + SequenceClassifier.Evaluate) on the same adapter.
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("qwen2"), ScalarType.Float32, CPU));
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        using var head = SequenceClassifier.Load(lm, adapter, SequenceClassifier.PadFor(tok, lm.Model.Config));
        var (samples, _) = JsonlDataset.Load(valid, tok, new DataOptions(), head.Labels);
        var (_, accuracy) = head.Evaluate(samples, 8, SequenceClassifier.PadFor(tok, lm.Model.Config) ?? 0);
        Assert.Equal(accuracy, report.Accuracy, 9);
        Assert.Equal(rows.Count, report.Confusion.Sum(r => r.Sum()));
        Assert.Equal(report.Correct, Enumerable.Range(0, clf.Labels.Count).Sum(i => report.Confusion[i][i]));
    }

    [Fact]
    public void PoolingSkipsTrailingPadTokensAsTransformersDoes()
    {
        using var clf = Load("qwen2");
        var pad = clf.Tokenizer.Config.PadToken!;
        Assert.NotNull(clf.Head.PadTokenId);
        var plain = clf.Classify(["reset my password"])[0];
        var padded = clf.Classify(["reset my password" + pad + pad])[0]; // tokens …, pad, pad: transformers pools "password"
        Assert.Equal(clf.Tokenizer.Encode("reset my password").Length + 2, clf.Encode("reset my password" + pad + pad).Length);
        Assert.True(Close.RelError(tensor(padded.Logits), tensor(plain.Logits)) <= 1e-5);
    }

    [Theory]
    [InlineData("qwen2")]
    [InlineData("llama")]
    public void MergeWritesASequenceClassificationCheckpointWithTheSameLogits(string arch)
    {
        var (adapter, _) = TinyClassifiers.Get(arch);
        var output = Path.Combine(Fixtures.TempDir(), "merged");
        var (code, stdout, stderr) = CliTests.RunCli("merge", "--no-gate", "--model", Fixtures.Model(arch), "--adapter", adapter, "--output", output);
        Assert.True(code == 0, stderr);
        Assert.Contains("ForSequenceClassification", stdout);

        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(output, "config.json")))!;
        string causal = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Model(arch), "config.json")))!["architectures"]![0]!.GetValue<string>();
        Assert.Equal(causal.Replace("ForCausalLM", "ForSequenceClassification"), config["architectures"]![0]!.GetValue<string>());
        using var clf = Load(arch);
        Assert.Equal(clf.Labels, Enumerable.Range(0, clf.Labels.Count).Select(i => config["id2label"]![i.ToString()]!.GetValue<string>()));
        Assert.All(clf.Labels.Select((l, i) => (l, i)), x => Assert.Equal(x.i, config["label2id"]![x.l]!.GetValue<int>()));
        Assert.Equal(clf.Head.PadTokenId, config["pad_token_id"]?.GetValue<int>());
        using (var files = CheckpointFiles.Open(output))
        {
            Assert.Contains("score.weight", files.Names);
            Assert.DoesNotContain("lm_head.weight", files.Names);
            Assert.DoesNotContain(files.Names, n => n.Contains("lora_"));
        }

        var texts = TinyClassifiers.All.Select(x => x.text).Where((_, i) => i % 7 == 0).ToList();
        using var merged = TextClassifier.Load(output, null, ScalarType.Float32, CPU);
        Assert.Equal(clf.Labels, merged.Labels);
        var a = Logits(clf.Classify(texts, 1));
        var m = Logits(merged.Classify(texts, 1));
        Assert.True(Close.RelError(m, a) <= 1e-4, $"merged vs adapter {Close.RelError(m, a):E2}");
        Assert.False(Close.RelError(m, Reference(arch, texts)) > 1e-4);

        // The merged classifier is not a causal LM; nor does it take another adapter.
        var (sc, _, se) = CliTests.RunCli("score", "--model", output, "--text", "hi", "--device", "cpu");
        Assert.Equal(1, sc);
        Assert.Equal($"error: {output} is a sequence-classification checkpoint (a merged classifier), not a causal LM; use `lorakit classify --model {output}`", se.Trim());
        (sc, var sout, se) = CliTests.RunCli("classify", "--model", output, "--text", texts[0], "--json", "--device", "cpu");
        Assert.True(sc == 0, se);
        Assert.True(Close.RelError(tensor(JsonNode.Parse(sout)!["predictions"]![0]!["logits"]!.AsArray().Select(x => x!.GetValue<float>()).ToArray()), m[0]) <= 1e-6);
        Assert.Contains("already a sequence classifier", Assert.ThrowsAny<LoraKitException>(() => TextClassifier.Load(output, adapter, ScalarType.Float32, CPU)).Message);
    }

    [Fact]
    public void CliClassifiesATextAndLabelledDataWithAccuracyAndConfusion()
    {
        var (adapter, valid) = TinyClassifiers.Get("qwen2");
        using var clf = Load("qwen2");
        var expected = clf.Classify(["refund my payment thanks"])[0];

        var (code, stdout, stderr) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--text", "refund my payment thanks", "--json", "--device", "cpu");
        Assert.True(code == 0, stderr);
        var j = JsonNode.Parse(stdout)!;
        var p = j["predictions"]![0]!;
        Assert.Equal(expected.Label, p["label"]!.GetValue<string>());
        Assert.True(Close.RelError(tensor(p["logits"]!.AsArray().Select(x => x!.GetValue<float>()).ToArray()), tensor(expected.Logits)) <= 1e-6);
        foreach (var (label, prob) in expected.Probabilities) Assert.Equal(prob, p["probabilities"]![label]!.GetValue<double>(), 6);

        (code, stdout, stderr) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--text", "refund my payment thanks", "--device", "cpu");
        Assert.True(code == 0, stderr);
        Assert.StartsWith(expected.Label + "  (", stdout);

        var rows = ClassificationData.Read(valid, clf.Labels);
        var preds = clf.ClassifyIds(ClassificationData.Encode(clf, valid, rows));
        var report = ClassificationReport.Of(clf.Labels, rows.Select(r => r.Label!.Value).ToList(), preds.Select(x => clf.Labels.ToList().IndexOf(x.Label)).ToList());
        (code, stdout, stderr) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--data", valid, "--device", "cpu", "--batch-size", "3");
        Assert.True(code == 0, stderr);
        Assert.Contains($"accuracy: {report.Accuracy:F4} ({report.Correct}/{report.Total})", stdout);
        Assert.Contains("confusion matrix (rows: true label, columns: predicted):", stdout);
        for (int i = 0; i < clf.Labels.Count; i++)
            Assert.Contains(clf.Labels[i].PadRight(10) + string.Concat(report.Confusion[i].Select(c => c.ToString().PadLeft(10))), stdout);

        (code, stdout, stderr) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--data", valid, "--device", "cpu", "--json");
        Assert.True(code == 0, stderr);
        j = JsonNode.Parse(stdout)!;
        Assert.Equal(report.Accuracy, j["accuracy"]!.GetValue<double>(), 9);
        Assert.Equal(report.Confusion.Select(r => r.ToList()), j["confusion"]!.AsArray().Select(r => r!.AsArray().Select(x => x!.GetValue<long>()).ToList()));
        Assert.Equal(rows.Select(r => r.Line), j["predictions"]!.AsArray().Select(x => x!["line"]!.GetValue<int>()));
    }

    [Fact]
    public void ClassificationAdaptersAreRefusedAsCausalLmsAndCausalAdaptersAsClassifiers()
    {
        var (adapter, _) = TinyClassifiers.Get("qwen2");
        foreach (var cmd in new[] { new[] { "score", "--text", "hello" }, new[] { "generate", "--prompt", "hello", "--max-new-tokens", "2" } })
        {
            var (code, _, stderr) = CliTests.RunCli([.. cmd, "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--device", "cpu"]);
            Assert.Equal(1, code);
            Assert.Equal($"error: adapter {adapter} is a sequence-classification adapter (labels: accounts, billing, other); use `lorakit classify`", stderr.Trim());
        }
        using (var lm = new LoraModel(CausalLM.Load(Fixtures.Model("qwen2"), ScalarType.Float32, CPU)))
            Assert.Throws<AdapterTaskException>(() => AdapterFiles.Load(lm, "x", adapter));

        var causal = Fixtures.Path_("adapters", "qwen2", "a");
        var (c2, _, e2) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", causal, "--text", "hi", "--device", "cpu");
        Assert.Equal(1, c2);
        Assert.StartsWith($"error: adapter {causal} is a CAUSAL_LM adapter", e2.Trim());
        Assert.Contains("not a sequence-classification (SEQ_CLS) adapter", e2);
        Assert.Throws<AdapterTaskException>(() => TextClassifier.Load(Fixtures.Model("qwen2"), causal, ScalarType.Float32, CPU));
        Assert.Contains("is a causal LM", Assert.ThrowsAny<LoraKitException>(() => TextClassifier.Load(Fixtures.Model("qwen2"), null, ScalarType.Float32, CPU)).Message);
    }

    [Fact]
    public void ClassifyErrorsAreOneLineNamingTheFileAndLine()
    {
        var (adapter, _) = TinyClassifiers.Get("qwen2");
        var dir = Fixtures.TempDir();
        var bad = Path.Combine(dir, "bad.jsonl");
        File.WriteAllLines(bad, ["{\"text\": \"reset my password\", \"label\": \"accounts\"}", "", "{\"text\": \"hello\", \"label\": \"sales\"}"]);
        var (code, _, stderr) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--data", bad, "--device", "cpu");
        Assert.Equal(1, code);
        Assert.Equal($"error: {bad}:3: label 'sales' is not one of the classifier's labels (accounts, billing, other)", stderr.Trim());

        (code, _, stderr) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--device", "cpu");
        Assert.Equal("error: give exactly one of --text or --data", stderr.Trim());
        (code, _, stderr) = CliTests.RunCli("classify", "--model", Fixtures.Model("qwen2"), "--adapter", adapter, "--device", "cpu", "--text", "");
        Assert.Equal("error: --text: the text is empty", stderr.Trim());

        using var clf = Load("qwen2");
        void Expect(string content, string message)
        {
            File.WriteAllText(bad, content);
            var e = Assert.Throws<DataException>(() => ClassificationData.Encode(clf, bad, ClassificationData.Read(bad, clf.Labels)));
            Assert.Equal($"{bad}:{message}", e.Message);
        }
        Expect("{\"text\": 5}", "1: field \"text\" must be a string");
        Expect("{\"label\": \"billing\"}", "1: missing field \"text\"");
        Expect("{\"text\": \"\"}", "1: field \"text\" is empty");
        Expect("{\"text\": \"a\", \"label\": null}", "1: field \"label\" must be a string (or an integer), not null");
        Expect("{\"text\": \"a\", \"label\": {\"x\": 1}}", "1: field \"label\" must be a string (or an integer), not an object");
        Expect("{\"text\": \"a\"}\n{\"text\": \"b\", \"label\": \"billing\"}", "2: a labelled line among unlabelled ones; label every line or none");
        Expect("{\"text\": \"a\", \"label\": \"billing\"}\n{\"text\": \"b\"}", "2: missing field \"label\" (line 1 is labelled); label every line or none");
        Expect("[1]", "1: the line is not a JSON object");
        Expect("{\"text\": \"" + string.Concat(Enumerable.Repeat("word ", 400)) + "\"}", $"1: the text has {clf.Tokenizer.Encode(string.Concat(Enumerable.Repeat("word ", 400))).Length} tokens; the model's limit (max_position_embeddings) is 256");
    }

    [Fact]
    public void AdapterInfoShowsTaskTypeAndLabels()
    {
        var (adapter, _) = TinyClassifiers.Get("qwen2");
        var (code, stdout, stderr) = CliTests.RunCli("adapter", "info", adapter);
        Assert.True(code == 0, stderr);
        Assert.Contains("task type:        SEQ_CLS (sequence classification: `lorakit classify`)", stdout);
        Assert.Contains("labels:           3: accounts, billing, other", stdout);
        (code, stdout, stderr) = CliTests.RunCli("adapter", "info", adapter, "--json");
        var j = JsonNode.Parse(stdout)!;
        Assert.Equal("SEQ_CLS", j["task_type"]!.GetValue<string>());
        Assert.Equal(["accounts", "billing", "other"], j["labels"]!.AsArray().Select(x => x!.GetValue<string>()));
        Assert.Equal(j["modules"]!.GetValue<int>() * 2 + 1, SafetensorsFile.Open(Path.Combine(adapter, AdapterFiles.WeightsFile)).Entries.Count);
        (code, stdout, _) = CliTests.RunCli("adapter", "info", Fixtures.Path_("adapters", "qwen2", "a"), "--json");
        Assert.Equal("CAUSAL_LM", JsonNode.Parse(stdout)!["task_type"]!.GetValue<string>());
    }

    [Fact]
    public void PeftMadeAdapterWithoutLabelsFileGetsTransformersDefaultLabels()
    {
        var copy = Fixtures.CopyOf(TinyClassifiers.Get("qwen2").adapter);
        File.Delete(Path.Combine(copy, AdapterFiles.LabelsFile));
        Assert.Equal(["LABEL_0", "LABEL_1", "LABEL_2"], AdapterFiles.Task(copy).Labels);
        File.WriteAllText(Path.Combine(copy, AdapterFiles.LabelsFile), "[\"a\", \"a\", \"b\"]");
        Assert.Contains("label 1 (\"a\") appears twice", Assert.Throws<LoraConfigException>(() => AdapterFiles.Task(copy)).Message);
        File.WriteAllText(Path.Combine(copy, AdapterFiles.LabelsFile), "[\"a\", \"b\"]");
        Assert.Contains("the score head has shape [3, 64], but 2 labels", Assert.Throws<LoraConfigException>(() => Load("qwen2", copy)).Message);
    }
}

/// <summary>POST /v1/classify and the server's task checks, against a live server with HttpClient.</summary>
[Collection(GlobalRng.Name)]
public class ClassifyServingTests : IAsyncLifetime
{
    const string UserKey = "user-key", AdminKey = "admin-key";
    OpenAiServer _server = null!;
    HttpClient _http = null!;

    public async Task InitializeAsync()
    {
        var root = Fixtures.TempDir();
        Fixtures.CopyOf(TinyClassifiers.Get("qwen2").adapter, Path.Combine(root, "clf"));
        Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen2", "a"), Path.Combine(root, "causal"));
        // A classification adapter whose labels.json links outside the adapters directory.
        var escape = Fixtures.CopyOf(TinyClassifiers.Get("qwen2").adapter, Path.Combine(root, "escape"));
        var outside = Path.Combine(Fixtures.TempDir(), "labels.json");
        File.WriteAllText(outside, "[\"x\", \"y\", \"z\"]");
        File.Delete(Path.Combine(escape, AdapterFiles.LabelsFile));
        File.CreateSymbolicLink(Path.Combine(escape, AdapterFiles.LabelsFile), outside);
        _server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen2"), Adapters = root, Port = 0, ApiKey = UserKey, AdminKey = AdminKey, Device = "cpu",
            MaxTokens = 16, MaxPromptTokens = 100, MaxBodyBytes = 1 << 20, ModelName = "tiny-qwen2",
        });
        _http = new HttpClient { BaseAddress = new Uri(_server.Url) };
    }

    public async Task DisposeAsync()
    {
        _http.Dispose();
        await _server.DisposeAsync();
    }

    internal static async Task<(HttpStatusCode code, JsonNode? body)> Post(HttpClient http, string path, string json, string? key = UserKey)
    {
        using var req = new HttpRequestMessage(HttpMethod.Post, path) { Content = new StringContent(json, Encoding.UTF8, "application/json") };
        if (key != null) req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
        using var res = await http.SendAsync(req);
        var text = await res.Content.ReadAsStringAsync();
        return (res.StatusCode, text.TrimStart().StartsWith('{') ? JsonNode.Parse(text) : null);
    }

    [Fact]
    public async Task ClassifiesOneOrManyTextsAsTheLibraryDoes()
    {
        string[] texts = ["refund my payment thanks", "hi, reset my password", "tell me a joke today"];
        using var clf = TextClassifier.Load(Fixtures.Model("qwen2"), TinyClassifiers.Get("qwen2").adapter, ScalarType.Float32, CPU);
        var expected = clf.Classify(texts);

        var (code, body) = await Post(_http, "/v1/classify", JsonSerializer.Serialize(new { model = "clf", input = texts }));
        Assert.Equal(HttpStatusCode.OK, code);
        Assert.Equal("list", body!["object"]!.GetValue<string>());
        Assert.Equal("clf", body["model"]!.GetValue<string>());
        var data = body["data"]!.AsArray();
        Assert.Equal(texts.Length, data.Count);
        for (int i = 0; i < texts.Length; i++)
        {
            Assert.Equal(i, data[i]!["index"]!.GetValue<int>());
            Assert.Equal(expected[i].Label, data[i]!["label"]!.GetValue<string>());
            foreach (var (label, p) in expected[i].Probabilities) Assert.Equal(p, data[i]!["probabilities"]![label]!.GetValue<double>(), 5);
        }
        (code, body) = await Post(_http, "/v1/classify", JsonSerializer.Serialize(new { model = "clf", input = texts[1] }));
        Assert.Equal(HttpStatusCode.OK, code);
        Assert.Equal(expected[1].Label, body!["data"]![0]!["label"]!.GetValue<string>());
    }

    [Fact]
    public async Task KeysAreEnforcedOnTheClassifyRoute()
    {
        var json = JsonSerializer.Serialize(new { model = "clf", input = "hi" });
        Assert.Equal(HttpStatusCode.Unauthorized, (await Post(_http, "/v1/classify", json, key: null)).code);
        Assert.Equal(HttpStatusCode.Unauthorized, (await Post(_http, "/v1/classify", json, key: "wrong")).code);
        Assert.Equal(HttpStatusCode.OK, (await Post(_http, "/v1/classify", json, key: UserKey)).code);
        Assert.Equal(HttpStatusCode.OK, (await Post(_http, "/v1/classify", json, key: AdminKey)).code);
    }

    [Fact]
    public async Task TaskMismatchesAndBadFieldsAre400WithTheField()
    {
        var (code, body) = await Post(_http, "/v1/chat/completions", JsonSerializer.Serialize(new { model = "clf", messages = new[] { new { role = "user", content = "hi" } } }));
        Assert.Equal(HttpStatusCode.BadRequest, code);
        Assert.Equal("adapter 'clf' is a sequence-classification adapter (labels: accounts, billing, other); use POST /v1/classify", body!["error"]!["message"]!.GetValue<string>());
        (code, _) = await Post(_http, "/v1/completions", JsonSerializer.Serialize(new { model = "clf", prompt = "hi" }));
        Assert.Equal(HttpStatusCode.BadRequest, code);
        (code, _) = await Post(_http, "/v1/completions", JsonSerializer.Serialize(new { model = "causal", prompt = "hi", max_tokens = 1 }));
        Assert.Equal(HttpStatusCode.OK, code);

        async Task Expect(string json, HttpStatusCode status, string param, string? message = null)
        {
            var (c, b) = await Post(_http, "/v1/classify", json);
            Assert.Equal(status, c);
            Assert.Equal(param, b!["error"]!["param"]!.GetValue<string>());
            if (message != null) Assert.Equal(message, b["error"]!["message"]!.GetValue<string>());
        }
        await Expect("{\"model\":\"causal\",\"input\":\"hi\"}", HttpStatusCode.BadRequest, "model",
            "adapter 'causal' is not a sequence-classification adapter (no score head and labels); use /v1/chat/completions or /v1/completions");
        await Expect("{\"model\":\"escape\",\"input\":\"hi\"}", HttpStatusCode.BadRequest, "model",
            "adapter 'escape' has a file that links outside the adapters directory");
        await Expect("{\"model\":\"tiny-qwen2\",\"input\":\"hi\"}", HttpStatusCode.BadRequest, "model");
        await Expect("{\"model\":\"base\",\"input\":\"hi\"}", HttpStatusCode.BadRequest, "model");
        await Expect("{\"model\":\"nope\",\"input\":\"hi\"}", HttpStatusCode.NotFound, "model");
        await Expect("{\"model\":\"../clf\",\"input\":\"hi\"}", HttpStatusCode.BadRequest, "model");
        await Expect("{\"model\":5,\"input\":\"hi\"}", HttpStatusCode.BadRequest, "model");
        await Expect("{\"input\":\"hi\"}", HttpStatusCode.BadRequest, "model");
        await Expect("{\"model\":\"clf\"}", HttpStatusCode.BadRequest, "input");
        await Expect("{\"model\":\"clf\",\"input\":[]}", HttpStatusCode.BadRequest, "input");
        await Expect("{\"model\":\"clf\",\"input\":[\"a\",5]}", HttpStatusCode.BadRequest, "input", "\"input\"[1] must be a string");
        await Expect("{\"model\":\"clf\",\"input\":\"\"}", HttpStatusCode.BadRequest, "input", "\"input\" is empty");
        await Expect("{\"model\":\"clf\",\"input\":{\"a\":1}}", HttpStatusCode.BadRequest, "input");
        await Expect("{\"model\":\"clf\",\"input\":\"" + string.Concat(Enumerable.Repeat("word ", 300)) + "\"}", HttpStatusCode.BadRequest, "input");
        await Expect("[1]", HttpStatusCode.BadRequest, "body");
        await Expect("{\"model\":", HttpStatusCode.BadRequest, "body");
    }
}
