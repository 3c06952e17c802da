using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;
using LoraKit.Server;
using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Serving;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>The batching engine: a batch mixing adapters and the base gives each request its solo greedy tokens.</summary>
public class InferenceEngineTests
{
    [Fact]
    public async Task AFailingDecodeStepFailsItsRequestsAndTheEngineGoesOn()
    {
        // Before: an exception in a decode step (here a streaming callback that throws, as a broken client writer
        // could) escaped the engine's thread and ended the whole process.
        var dir = Fixtures.Model("qwen3");
        var tok = Tokenizer.Load(dir);
        using var engine = new InferenceEngine(new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU)), tok);
        int calls = 0;
        var failing = engine.GenerateAsync(tok.Encode("Hello, world!"), null, new SamplingOptions { MaxNewTokens = 8, EosTokenIds = [] },
            _ => { if (++calls >= 2) throw new IOException("client went away"); });
        var ex = await Assert.ThrowsAsync<IOException>(() => failing);
        Assert.Equal("client went away", ex.Message);
        var after = await engine.GenerateAsync(tok.Encode("Hello, world!"), null, new SamplingOptions { MaxNewTokens = 4, EosTokenIds = [] });
        Assert.Equal(4, after.OutputIds.Length);
    }

    [Theory]
    [InlineData("qwen3", "regex")]
    [InlineData("gemma2", "b")] // sliding windows and soft-capped attention under left padding and a growing cache
    [InlineData("gemma3", "b")] // per-layer-type RoPE, q/k norms
    public async Task MixedAdapterBatchEqualsEachRequestAlone(string arch, string other)
    {
        var dir = Fixtures.Model(arch);
        var tok = Tokenizer.Load(dir);
        string?[] adapters = [null, "a", other, "a", null, other, "a", other];
        string[] prompts = ["Hello, world! How are", "def forward(x):", "Numbers like 12345", "The quick brown fox", "reset my password",
            "Low-rank adapters", "my invoice is wrong and", "Customers ask about"];

        // Expected: each prompt alone, through TextGenerator, with only its adapter active.
        var expected = new List<int[]>();
        using (var solo = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU)))
        {
            AdapterFiles.Load(solo, "a", Fixtures.Path_("adapters", arch, "a"));
            AdapterFiles.Load(solo, other, Fixtures.Path_("adapters", arch, other));
            var gen = new TextGenerator(solo.Model, tok);
            for (int i = 0; i < prompts.Length; i++)
            {
                if (adapters[i] is string a) { solo.SetDisabled(false); solo.SetActive(a); } else solo.SetDisabled(true);
                expected.Add(gen.Generate(tok.Encode(prompts[i]), new SamplingOptions { MaxNewTokens = 12 + i }).OutputIds);
            }
        }

        var lm = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU));
        AdapterFiles.Load(lm, "a", Fixtures.Path_("adapters", arch, "a"));
        AdapterFiles.Load(lm, other, Fixtures.Path_("adapters", arch, other));
        lm.SetActive();
        using var engine = new InferenceEngine(lm, tok, maxBatch: 8);
        var tasks = prompts.Select((p, i) => engine.GenerateAsync(tok.Encode(p), adapters[i], new SamplingOptions { MaxNewTokens = 12 + i })).ToList();
        var results = await Task.WhenAll(tasks);
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(expected[i], results[i].OutputIds);
        Assert.True(engine.PeakBatch >= 4, $"requests should have been batched (peak batch {engine.PeakBatch})");
    }
}

/// <summary>The real server on a loopback port, driven by a real HTTP client.</summary>
public sealed class ServerTests : IAsyncLifetime
{
    const string UserKey = "user-key-123";
    const string AdminKey = "admin-key-456";
    OpenAiServer _server = null!;
    HttpClient _http = null!;
    HttpClient _anon = null!;
    string _adapters = null!;

    public static string AdapterRoot()
    {
        var root = Fixtures.TempDir();
        foreach (var name in new[] { "a", "regex" }) Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", name), Path.Combine(root, name));
        Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", "a"), Path.Combine(root, "a2")); // a third, so the 2-slot LRU must evict
        // An adapter made for another base (Llama shapes) and a symlink leading outside the root.
        Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", "a"), Path.Combine(root, "llama-adapter"));
        var outside = Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", "a"));
        Directory.CreateSymbolicLink(Path.Combine(root, "escape"), outside);
        return root;
    }

    readonly System.Collections.Concurrent.ConcurrentQueue<string> ServerErrors = new();

    public async Task InitializeAsync()
    {
        _adapters = AdapterRoot();
        _server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen3"), Adapters = _adapters, Port = 0, ApiKey = UserKey, AdminKey = AdminKey, Device = "cpu",
            MaxLoadedAdapters = 2, MaxTokens = 64, MaxPromptTokens = 200, MaxBodyBytes = 8192, MaxStopStrings = 2, ModelName = "tiny-qwen3",
            Log = l => { if (l.StartsWith("error:", StringComparison.Ordinal)) ServerErrors.Enqueue(l); }, // what a 500 was, for the assertion messages
        });
        _http = new HttpClient { BaseAddress = new Uri(_server.Url) };
        _http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", UserKey);
        _anon = new HttpClient { BaseAddress = new Uri(_server.Url) };
    }

    public async Task DisposeAsync()
    {
        _http.Dispose();
        _anon.Dispose();
        await _server.DisposeAsync();
    }

    async Task<(HttpStatusCode code, JsonNode? body)> Post(string path, object body, string? key = UserKey)
    {
        using var req = new HttpRequestMessage(HttpMethod.Post, path) { Content = new StringContent(System.Text.Json.JsonSerializer.Serialize(body), Encoding.UTF8, "application/json") };
        if (key != null) req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
        using var res = await _anon.SendAsync(req); // no default header: the key is exactly what the test says
        var text = await res.Content.ReadAsStringAsync();
        return (res.StatusCode, text.Length > 0 && text.TrimStart().StartsWith('{') ? JsonNode.Parse(text) : null);
    }

    static int[] Greedy(string? adapter, string prompt, int maxTokens)
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("qwen3"), ScalarType.Float32, CPU));
        if (adapter != null) AdapterFiles.Load(lm, adapter, Fixtures.Path_("adapters", "qwen3", adapter));
        var tok = Tokenizer.Load(Fixtures.Model("qwen3"));
        var eos = StopTokens.EosTokenIds(lm.Model.Config, tok, Fixtures.Model("qwen3"));
        return new TextGenerator(lm.Model, tok).Generate(tok.Encode(prompt), new SamplingOptions { MaxNewTokens = maxTokens, EosTokenIds = eos }).OutputIds;
    }

    [Fact]
    public async Task HealthNeedsNoKeyAndModelsListBaseAndAdapters()
    {
        using var anon = new HttpClient { BaseAddress = new Uri(_server.Url) };
        Assert.Equal(HttpStatusCode.OK, (await anon.GetAsync("/health")).StatusCode);
        Assert.Equal(HttpStatusCode.Unauthorized, (await anon.GetAsync("/v1/models")).StatusCode);
        var models = JsonNode.Parse(await _http.GetStringAsync("/v1/models"))!["data"]!.AsArray().Select(m => m!["id"]!.GetValue<string>()).ToList();
        Assert.Contains("tiny-qwen3", models);
        Assert.Contains("a", models);
        Assert.Contains("regex", models);
    }

    [Theory]
    [InlineData(null)]
    [InlineData("a")]
    [InlineData("regex")]
    public async Task CompletionUsesTheRequestedAdapter(string? adapter)
    {
        var (code, body) = await Post("/v1/completions", new { model = adapter ?? "base", prompt = "Hello, world! How are", max_tokens = 10, temperature = 0 });
        Assert.Equal(HttpStatusCode.OK, code);
        var tok = Tokenizer.Load(Fixtures.Model("qwen3"));
        var expected = tok.Decode(Greedy(adapter, "Hello, world! How are", 10), skipSpecialTokens: true);
        Assert.Equal(expected, body!["choices"]![0]!["text"]!.GetValue<string>());
        Assert.Equal("text_completion", body["object"]!.GetValue<string>());
        Assert.Equal(tok.Encode("Hello, world! How are").Length, body["usage"]!["prompt_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task ChatCompletionAndItsStreamAgree()
    {
        var request = new { model = "a", messages = new[] { new { role = "user", content = "reset my password" } }, max_tokens = 12, temperature = 0 };
        var (code, body) = await Post("/v1/chat/completions", request);
        Assert.Equal(HttpStatusCode.OK, code);
        string text = body!["choices"]![0]!["message"]!["content"]!.GetValue<string>();
        Assert.Equal("assistant", body["choices"]![0]!["message"]!["role"]!.GetValue<string>());

        using var req = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions")
        {
            Content = new StringContent(System.Text.Json.JsonSerializer.Serialize(new { model = "a", messages = request.messages, max_tokens = 12, temperature = 0, stream = true, stream_options = new { include_usage = true } }), Encoding.UTF8, "application/json"),
        };
        using var res = await _http.SendAsync(req, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal("text/event-stream", res.Content.Headers.ContentType!.MediaType);
        var lines = (await res.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", lines[^1]);
        var chunks = lines[..^1].Select(l => JsonNode.Parse(l["data: ".Length..])!).ToList();
        Assert.All(chunks, ch => Assert.Equal("chat.completion.chunk", ch["object"]!.GetValue<string>()));
        string streamed = string.Concat(chunks.Where(ch => ch["choices"]!.AsArray().Count > 0).Select(ch => ch["choices"]![0]!["delta"]!["content"]?.GetValue<string>() ?? ""));
        Assert.Equal(text, streamed);
        Assert.NotNull(chunks[^1]["usage"]);
    }

    [Fact]
    public async Task OfficialOpenAiClientWorksUnchanged()
    {
        var client = new OpenAI.Chat.ChatClient("a", new System.ClientModel.ApiKeyCredential(UserKey),
            new OpenAI.OpenAIClientOptions { Endpoint = new Uri(_server.Url + "/v1") });
        var options = new OpenAI.Chat.ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = 12 };
        var completion = (await client.CompleteChatAsync([new OpenAI.Chat.UserChatMessage("reset my password")], options)).Value;
        string text = completion.Content[0].Text;
        var (_, raw) = await Post("/v1/chat/completions", new { model = "a", messages = new[] { new { role = "user", content = "reset my password" } }, max_tokens = 12, temperature = 0 });
        Assert.Equal(raw!["choices"]![0]!["message"]!["content"]!.GetValue<string>(), text);
        Assert.True(completion.Usage.OutputTokenCount > 0);

        var streamed = new StringBuilder();
        await foreach (var update in client.CompleteChatStreamingAsync([new OpenAI.Chat.UserChatMessage("reset my password")], options))
            foreach (var part in update.ContentUpdate) streamed.Append(part.Text);
        Assert.Equal(text, streamed.ToString());

        var models = new OpenAI.Models.OpenAIModelClient(new System.ClientModel.ApiKeyCredential(UserKey), new OpenAI.OpenAIClientOptions { Endpoint = new Uri(_server.Url + "/v1") });
        Assert.Contains((await models.GetModelsAsync()).Value, m => m.Id == "regex");
    }

    [Fact]
    public async Task KeysAreCheckedAndAdminIsSeparate()
    {
        Assert.Equal(HttpStatusCode.Unauthorized, (await Post("/v1/completions", new { model = "base", prompt = "hi" }, key: null)).code);
        Assert.Equal(HttpStatusCode.Unauthorized, (await Post("/v1/completions", new { model = "base", prompt = "hi" }, key: "wrong")).code);
        Assert.Equal(HttpStatusCode.OK, (await Post("/v1/completions", new { model = "base", prompt = "hi", max_tokens = 2 })).code);
        Assert.Equal(HttpStatusCode.Forbidden, (await Post("/admin/adapters/a/load", new { })).code);
        Assert.Equal(HttpStatusCode.Unauthorized, (await Post("/admin/adapters/a/load", new { }, key: null)).code);
        Assert.Equal(HttpStatusCode.OK, (await Post("/admin/adapters/a/load", new { }, key: AdminKey)).code);
    }

    [Fact]
    public async Task AdminLoadsReloadsUnloadsAndEvictsLeastRecentlyUsed()
    {
        var (code, body) = await Post("/admin/adapters/a/load", new { }, AdminKey);
        Assert.Equal(HttpStatusCode.OK, code);
        Assert.Contains("a", body!["loaded"]!.AsArray().Select(x => x!.GetValue<string>()));
        Assert.Equal(HttpStatusCode.OK, (await Post("/admin/adapters/a/reload", new { }, AdminKey)).code);
        using (var del = new HttpRequestMessage(HttpMethod.Delete, "/admin/adapters/a"))
        {
            del.Headers.Authorization = new AuthenticationHeaderValue("Bearer", AdminKey);
            Assert.Equal(HttpStatusCode.OK, (await _http.SendAsync(del)).StatusCode);
        }
        using (var del = new HttpRequestMessage(HttpMethod.Delete, "/admin/adapters/a"))
        {
            del.Headers.Authorization = new AuthenticationHeaderValue("Bearer", AdminKey);
            Assert.Equal(HttpStatusCode.NotFound, (await _http.SendAsync(del)).StatusCode);
        }
        // Cap of 2 loaded adapters: a, then regex, then a2 evicts a (the least recently used); using a again evicts regex.
        List<string> Loaded() => JsonNode.Parse(AdminGet("/admin/adapters").Result)!["loaded"]!.AsArray().Select(x => x!.GetValue<string>()).ToList();
        Assert.Equal(HttpStatusCode.OK, (await Post("/v1/completions", new { model = "a", prompt = "hi", max_tokens = 1 })).code);
        Assert.Equal(HttpStatusCode.OK, (await Post("/v1/completions", new { model = "regex", prompt = "hi", max_tokens = 1 })).code);
        Assert.Equal(["regex", "a"], Loaded()); // most recent first
        Assert.Equal(HttpStatusCode.OK, (await Post("/v1/completions", new { model = "a2", prompt = "hi", max_tokens = 1 })).code);
        Assert.Equal(["a2", "regex"], Loaded());
        Assert.Equal(HttpStatusCode.OK, (await Post("/v1/completions", new { model = "a", prompt = "hi", max_tokens = 1 })).code);
        Assert.Equal(["a", "a2"], Loaded());
    }

    async Task<string> AdminGet(string path)
    {
        using var req = new HttpRequestMessage(HttpMethod.Get, path);
        req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", AdminKey);
        using var res = await _http.SendAsync(req);
        return await res.Content.ReadAsStringAsync();
    }

    [Theory]
    [InlineData("../a")]
    [InlineData("a/../../etc")]
    [InlineData("/etc/passwd")]
    [InlineData("escape")]
    public async Task UnsafeAdapterNamesAreRefused(string name)
    {
        var (code, body) = await Post("/v1/completions", new { model = name, prompt = "hi", max_tokens = 2 });
        Assert.Equal(HttpStatusCode.BadRequest, code);
        Assert.Equal("model", body!["error"]!["param"]!.GetValue<string>());
    }

    [Fact]
    public async Task AdapterForAnotherBaseOrUnknownIsRefused()
    {
        var (code, body) = await Post("/v1/completions", new { model = "llama-adapter", prompt = "hi", max_tokens = 2 });
        Assert.Equal((HttpStatusCode)422, code);
        Assert.Contains("does not fit this base model", body!["error"]!["message"]!.GetValue<string>());
        Assert.Equal(HttpStatusCode.NotFound, (await Post("/v1/completions", new { model = "nope", prompt = "hi" })).code);
    }

    [Theory]
    [InlineData("max_tokens", 65, "max_tokens")]
    [InlineData("temperature", 2.5, "temperature")]
    [InlineData("top_p", 0.0, "top_p")]
    public async Task SamplingLimitsAreEnforced(string field, double value, string param)
    {
        var body = new Dictionary<string, object> { ["model"] = "base", ["prompt"] = "hi", [field] = value };
        var (code, res) = await Post("/v1/completions", body);
        Assert.Equal(HttpStatusCode.BadRequest, code);
        Assert.Equal(param, res!["error"]!["param"]!.GetValue<string>());
    }

    [Fact]
    public async Task PromptStopAndBodyLimitsAreEnforced()
    {
        Assert.Equal(HttpStatusCode.BadRequest, (await Post("/v1/completions", new { model = "base", prompt = "hi", stop = new[] { "a", "b", "c" } })).code);
        Assert.Equal(HttpStatusCode.BadRequest, (await Post("/v1/completions", new { model = "base", prompt = string.Join(" ", Enumerable.Repeat("word", 300)) })).code);
        var (code, _) = await Post("/v1/completions", new { model = "base", prompt = new string('x', 9000) });
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, code);
        Assert.Equal(HttpStatusCode.BadRequest, (await Post("/v1/completions", new { prompt = "no model" })).code);
    }

    [Fact]
    public async Task ManyConcurrentClientsOverSeveralAdaptersAllGetCorrectAnswers()
    {
        string[] prompts = ["Hello, world! How are", "def forward(x):", "reset my password", "The quick brown fox"];
        string[] models = ["base", "a", "regex"];
        // Reference answers, one request at a time.
        var expected = new Dictionary<(string, string), string>();
        foreach (var m in models)
            foreach (var p in prompts)
                expected[(m, p)] = (await Post("/v1/completions", new { model = m, prompt = p, max_tokens = 8, temperature = 0 })).body!["choices"]![0]!["text"]!.GetValue<string>();
        // 32 clients at once, each sending its 20 requests one after another.
        var perClient = await Task.WhenAll(Enumerable.Range(0, 32).Select(async client =>
        {
            var mine = new List<((string, string) w, HttpStatusCode code, string? text)>();
            for (int k = 0; k < 20; k++)
            {
                var w = (models[(client + k) % 3], prompts[(client * 5 + k) % 4]);
                var (code, body) = await Post("/v1/completions", new { model = w.Item1, prompt = w.Item2, max_tokens = 8, temperature = 0 });
                mine.Add((w, code, body?["choices"]?[0]?["text"]?.GetValue<string>()));
            }
            return mine;
        }));
        var results = perClient.SelectMany(x => x).ToList();
        Assert.Equal(640, results.Count); // 32 clients × 20 requests, none lost
        Assert.All(results, r =>
        {
            Assert.True(r.code == HttpStatusCode.OK, $"{r.w}: {r.code}; server log: {string.Join(" | ", ServerErrors)}");
            Assert.Equal(expected[r.w], r.text);
        });
        Assert.True(_server.Engine.PeakBatch > 1, "concurrent requests should share decode steps");
    }
}

public class ServerQueueTests
{
    [Fact]
    public async Task BeyondConcurrencyAndQueueRequestsGet429()
    {
        // A context beyond the 1,000 tokens streamed (the fixture's 256 ends generation early).
        var model = Fixtures.CopyOf(Fixtures.Model("qwen2"));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(model, "config.json")))!;
        config["max_position_embeddings"] = 1100;
        File.WriteAllText(Path.Combine(model, "config.json"), config.ToJsonString());
        await using var server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = model, Adapters = Fixtures.TempDir(), Port = 0, Device = "cpu", MaxConcurrent = 1, MaxQueued = 0, MaxTokens = 1000,
        });
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        var content = (bool stream) => new StringContent("{\"model\":\"base\",\"prompt\":\"Hello\",\"max_tokens\":1000,\"temperature\":0,\"ignore_eos\":true,\"stream\":" +
            (stream ? "true" : "false") + "}", Encoding.UTF8, "application/json");
        // The first request streams 1,000 tokens (EOS ignored); once its first event has arrived it holds the only slot
        // for seconds, so the second is refused without relying on fixed delays.
        using var slow = await http.SendAsync(new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = content(true) }, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, slow.StatusCode);
        using var reader = new StreamReader(await slow.Content.ReadAsStreamAsync());
        Assert.StartsWith("data:", await reader.ReadLineAsync());
        var rejected = await http.PostAsync("/v1/completions", content(false));
        Assert.Equal((HttpStatusCode)429, rejected.StatusCode);
        Assert.Contains("[DONE]", await reader.ReadToEndAsync());
    }
}

public class ChatClientTests
{
    [Fact]
    public async Task IChatClientPicksTheAdapterByModelIdAndStreams()
    {
        var dir = Fixtures.Model("qwen3");
        var tok = Tokenizer.Load(dir);
        var lm = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU));
        using var engine = new InferenceEngine(lm, tok);
        var registry = new AdapterRegistry(engine, ServerTests.AdapterRoot(), 4);
        var eos = new[] { tok.EosTokenId!.Value };
        using Microsoft.Extensions.AI.IChatClient client = new LoraKitChatClient(engine, registry, eos);
        var messages = new[] { new Microsoft.Extensions.AI.ChatMessage(Microsoft.Extensions.AI.ChatRole.User, "reset my password") };
        var options = new Microsoft.Extensions.AI.ChatOptions { ModelId = "regex", Temperature = 0, MaxOutputTokens = 10 };
        var response = await client.GetResponseAsync(messages, options);

        // The same thing by hand: template, adapter, greedy decoding.
        using var solo = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, CPU));
        AdapterFiles.Load(solo, "regex", Fixtures.Path_("adapters", "qwen3", "regex"));
        var prompt = new ChatTemplate(tok.Config.ChatTemplate!).Render([new("user", "reset my password")], true, tok.Config);
        var expected = new TextGenerator(solo.Model, tok).Generate(tok.Encode(prompt, addSpecialTokens: false), new SamplingOptions { MaxNewTokens = 10, EosTokenIds = eos });
        Assert.Equal(expected.Text, response.Text);
        Assert.Equal(expected.OutputIds.Length, (int)response.Usage!.OutputTokenCount!);

        var streamed = new StringBuilder();
        await foreach (var u in client.GetStreamingResponseAsync(messages, options)) streamed.Append(u.Text);
        Assert.Equal(expected.Text, streamed.ToString());

        var baseResponse = await client.GetResponseAsync(messages, new Microsoft.Extensions.AI.ChatOptions { Temperature = 0, MaxOutputTokens = 10 });
        Assert.NotEqual(response.Text, baseResponse.Text); // no ModelId: the base model
    }
}
