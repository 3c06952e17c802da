using System.Diagnostics;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LoraKit.Server;
using LoraKit.Generation;
using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>Issue 16's server items: auth on the matched route, typed fields, no paths, context length, SIGTERM, logging.</summary>
public class ServerHardeningTests
{
    const string UserKey = "user-key-123";
    const string AdminKey = "admin-key-456";

    public static async Task<OpenAiServer> Start(string? apiKey, string? adminKey, string? adapters = null, Action<string>? log = null, string arch = "qwen3", string? model = null) =>
        await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = model ?? Fixtures.Model(arch), Adapters = adapters ?? ServerTests.AdapterRoot(), Port = 0, ApiKey = apiKey, AdminKey = adminKey, Device = "cpu",
            MaxTokens = 64, MaxBodyBytes = 65536, ModelName = "tiny", Log = log,
        });

    public static async Task<(int code, string text, JsonNode? body)> Send(HttpClient http, HttpMethod method, string path, string? body = null, string? authorization = null,
        string contentType = "application/json")
    {
        using var req = new HttpRequestMessage(method, path);
        if (body != null) req.Content = new StringContent(body, Encoding.UTF8, contentType);
        if (authorization != null) req.Headers.TryAddWithoutValidation("Authorization", authorization);
        using var res = await http.SendAsync(req);
        var text = await res.Content.ReadAsStringAsync();
        JsonNode? node = null;
        try { node = text.Length > 0 ? JsonNode.Parse(text) : null; } catch (System.Text.Json.JsonException) { }
        return ((int)res.StatusCode, text, node);
    }

    // ---- item 1: admin-auth bypass ----

    public static TheoryData<string?, string?> KeyConfigs => new() { { UserKey, null }, { null, AdminKey }, { UserKey, AdminKey }, { null, null } };

    [Theory]
    [MemberData(nameof(KeyConfigs))]
    public async Task EveryRouteInEveryCaseIsAuthorizedByItsEndpointNotItsSpelling(string? apiKey, string? adminKey)
    {
        await using var server = await Start(apiKey, adminKey);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        bool open = apiKey is null && adminKey is null;
        var routes = new List<(HttpMethod m, string path, string? body, bool admin)>();
        foreach (var p in new[] { "/admin/adapters", "/ADMIN/adapters", "/Admin/Adapters", "/admin/adapters/", "/aDmIn/ADAPTERS" })
            routes.Add((HttpMethod.Get, p, null, true));
        foreach (var p in new[] { "/admin/adapters/a/load", "/ADMIN/adapters/a/load", "/Admin/adapters/a/LOAD", "/admin/adapters/a/reload", "/ADMIN/ADAPTERS/a/RELOAD" })
            routes.Add((HttpMethod.Post, p, "{}", true));
        foreach (var p in new[] { "/admin/adapters/a", "/ADMIN/adapters/a", "/Admin/Adapters/a" })
            routes.Add((HttpMethod.Delete, p, null, true));
        foreach (var p in new[] { "/v1/models", "/v1/MODELS", "/V1/Models" })
            routes.Add((HttpMethod.Get, p, null, false));
        foreach (var p in new[] { "/v1/completions", "/V1/COMPLETIONS" })
            routes.Add((HttpMethod.Post, p, "{\"model\":\"base\",\"prompt\":\"hi\",\"max_tokens\":1}", false));
        routes.Add((HttpMethod.Post, "/v1/Chat/Completions", "{\"model\":\"base\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1}", false));
        var keys = new (string name, string? header, bool isUser, bool isAdmin)[]
        {
            ("none", null, false, false), ("empty", "", false, false), ("wrong", "Bearer nope", false, false),
            ("user", "Bearer " + UserKey, apiKey != null, false), ("user-lowercase-scheme", "bearer " + UserKey, apiKey != null, false),
            ("admin", "Bearer " + AdminKey, false, adminKey != null), ("admin-upper-scheme", "BEARER  " + AdminKey, false, adminKey != null),
            ("admin-as-basic", "Basic " + AdminKey, false, false), ("admin-no-scheme", AdminKey, false, false),
        };
        foreach (var (m, path, body, admin) in routes)
            foreach (var (name, header, isUser, isAdmin) in keys)
            {
                var (code, text, json) = await Send(http, m, path, body, header);
                bool allowed = open || (admin ? isAdmin : isUser || isAdmin);
                string what = $"{m} {path} with {name} key (api-key {apiKey != null}, admin-key {adminKey != null}): {code} {text}";
                if (allowed) Assert.True(code is not (401 or 403), what);
                else
                {
                    Assert.True(code is 401 or 403, what);
                    Assert.NotNull(json?["error"]?["message"]);
                }
            }
        // /health never needs a key.
        Assert.Equal(200, (await Send(http, HttpMethod.Get, "/HEALTH")).code);
    }

    [Fact]
    public async Task UnknownRoutesAndMethodsNeedAKeyAndAnswerWithAJsonError()
    {
        await using var server = await Start(UserKey, AdminKey);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        Assert.Equal(401, (await Send(http, HttpMethod.Get, "/secret")).code);
        var (code, _, body) = await Send(http, HttpMethod.Get, "/nope", authorization: "Bearer " + UserKey);
        Assert.Equal(404, code);
        Assert.Contains("no such endpoint", body!["error"]!["message"]!.GetValue<string>());
        (code, _, body) = await Send(http, HttpMethod.Put, "/v1/completions", "{}", "Bearer " + UserKey);
        Assert.Equal(405, code);
        Assert.NotNull(body!["error"]!["message"]);
    }

    // ---- item 11: wrongly typed JSON ----

    [Theory]
    [InlineData("{\"model\":5,\"prompt\":\"hi\"}", "model")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"n\":1.5}", "n")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"n\":\"2\"}", "n")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"stream\":\"yes\"}", "stream")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"stream_options\":\"x\"}", "stream_options")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"stream_options\":{\"include_usage\":1}}", "stream_options.include_usage")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"seed\":\"abc\"}", "seed")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"seed\":1.5}", "seed")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"seed\":1180591620717411303424}", "seed")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"stop\":[\"a\",5]}", "stop")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"max_tokens\":-1}", "max_tokens")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"max_tokens\":1e400}", "max_tokens")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"temperature\":\"hot\"}", "temperature")]
    [InlineData("{\"model\":\"base\",\"prompt\":\"hi\",\"logprobs\":3}", "logprobs")]
    [InlineData("{\"model\":\"base\",\"prompt\":5}", "prompt")]
    [InlineData("{\"model\":\"base\",\"messages\":[1]}", "messages[0]")]
    [InlineData("{\"model\":\"base\",\"messages\":[{\"role\":5,\"content\":\"hi\"}]}", "messages[0].role")]
    [InlineData("{\"model\":\"base\",\"messages\":[{\"role\":\"user\",\"content\":7}]}", "messages[0].content")]
    [InlineData("{\"model\":\"base\",\"messages\":\"hi\"}", "messages")]
    [InlineData("{\"model\":\"base\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"logprobs\":true,\"top_logprobs\":2}", "logprobs")]
    [InlineData("{\"model\":\"base\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_completion_tokens\":\"9\"}", "max_completion_tokens")]
    public async Task WronglyTypedFieldsAre400NamingTheField(string body, string param)
    {
        await using var server = await Start(UserKey, null);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        string path = body.Contains("\"messages\"") ? "/v1/chat/completions" : "/v1/completions";
        var (code, text, json) = await Send(http, HttpMethod.Post, path, body, "Bearer " + UserKey);
        Assert.True(code == 400, $"{code} {text}");
        Assert.Equal(param, json!["error"]!["param"]!.GetValue<string>());
        Assert.Contains(param.Split('[', '.')[0], json["error"]!["message"]!.GetValue<string>());
    }

    [Theory]
    [InlineData("", "empty")]
    [InlineData("{\"model\":\"base\",", "not valid JSON")]
    [InlineData("[1,2]", "must be a JSON object")]
    [InlineData("null", "must be a JSON object")]
    [InlineData("{\"model\":\"base\",\"model\":\"a\",\"prompt\":\"hi\"}", "not valid JSON")]
    public async Task MalformedBodiesAre400WithAReason(string body, string expected)
    {
        await using var server = await Start(null, null);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        var (code, text, json) = await Send(http, HttpMethod.Post, "/v1/completions", body);
        Assert.True(code == 400, $"{code} {text}");
        Assert.Contains(expected, json!["error"]!["message"]!.GetValue<string>());
        Assert.DoesNotContain("LineNumber", text);
    }

    [Fact]
    public async Task ATinyTemperatureIsGreedyNotA500()
    {
        await using var server = await Start(null, null);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        var greedy = await Send(http, HttpMethod.Post, "/v1/completions", "{\"model\":\"base\",\"prompt\":\"Hello, world!\",\"max_tokens\":8,\"temperature\":0}");
        var tiny = await Send(http, HttpMethod.Post, "/v1/completions", "{\"model\":\"base\",\"prompt\":\"Hello, world!\",\"max_tokens\":8,\"temperature\":1e-300}");
        Assert.True(tiny.code == 200, tiny.text);
        Assert.Equal(greedy.body!["choices"]![0]!["text"]!.GetValue<string>(), tiny.body!["choices"]![0]!["text"]!.GetValue<string>());

        var dir = Fixtures.Model("qwen3");
        var tok = Tokenizer.Load(dir);
        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        var gen = new TextGenerator(model, tok);
        var ids = tok.Encode("Hello, world!");
        Assert.Equal(gen.Generate(ids, new SamplingOptions { MaxNewTokens = 8 }).OutputIds,
            gen.Generate(ids, new SamplingOptions { MaxNewTokens = 8, Temperature = 1e-300, Seed = 1 }).OutputIds);
    }

    // ---- item 5: no server paths in client errors ----

    [Fact]
    public async Task AdapterLoadErrorsCarryNoServerPaths()
    {
        var root = ServerTests.AdapterRoot();
        var broken = Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", "a"), Path.Combine(root, "broken"));
        File.WriteAllBytes(Path.Combine(broken, "adapter_model.safetensors"), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        var noWeights = Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", "a"), Path.Combine(root, "noweights"));
        File.Delete(Path.Combine(noWeights, "adapter_model.safetensors"));
        await using var server = await Start(null, null, root);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        foreach (var name in new[] { "broken", "noweights", "llama-adapter" })
        {
            var use = await Send(http, HttpMethod.Post, "/v1/completions", $"{{\"model\":\"{name}\",\"prompt\":\"hi\",\"max_tokens\":1}}");
            var load = await Send(http, HttpMethod.Post, $"/admin/adapters/{name}/load", "{}");
            foreach (var (code, text, _) in new[] { use, load })
            {
                Assert.True(code == 422, $"{name}: {code} {text}");
                Assert.DoesNotContain(Path.GetTempPath().TrimEnd('/'), text);
                Assert.DoesNotContain(Fixtures.Root, text);
                Assert.Contains(name, text);
            }
        }
    }

    // ---- item 10: context length ----

    static string LongPrompt(Tokenizer tok, int tokens)
    {
        var words = new StringBuilder("Hello");
        while (tok.Encode(words.ToString()).Length < tokens) words.Append(" word");
        return words.ToString();
    }

    [Fact]
    public async Task PromptsPastTheContextAreRefusedAndGenerationStopsAtIt()
    {
        var dir = Fixtures.Model("qwen3");
        var tok = Tokenizer.Load(dir);
        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        int context = model.Config.MaxPositionEmbeddings;
        string fits = LongPrompt(tok, context - 10), tooLong = LongPrompt(tok, context);
        int fitsTokens = tok.Encode(fits).Length;

        // Library.
        var gen = new TextGenerator(model, tok);
        var r = gen.Generate(tok.Encode(fits), new SamplingOptions { MaxNewTokens = 64 });
        Assert.Equal(context - fitsTokens, r.OutputIds.Length);
        Assert.Equal(FinishReason.Length, r.FinishReason);
        var e = Assert.Throws<LoraKitException>(() => gen.Generate(tok.Encode(tooLong), new SamplingOptions { MaxNewTokens = 4 }));
        Assert.Contains("max_position_embeddings", e.Message);

        // Server: 400 for the prompt, "length" at the context, in both the body and the stream.
        await using var server = await Start(null, null);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        string Body(string prompt, bool stream) => new JsonObject { ["model"] = "base", ["prompt"] = prompt, ["max_tokens"] = 64, ["ignore_eos"] = true, ["temperature"] = 0, ["stream"] = stream }.ToJsonString();
        var (code, text, json) = await Send(http, HttpMethod.Post, "/v1/completions", Body(tooLong, false));
        Assert.True(code == 400, text);
        Assert.Equal("prompt", json!["error"]!["param"]!.GetValue<string>());
        (code, text, json) = await Send(http, HttpMethod.Post, "/v1/completions", Body(fits, false));
        Assert.True(code == 200, text);
        Assert.Equal("length", json!["choices"]![0]!["finish_reason"]!.GetValue<string>());
        Assert.Equal(context, json["usage"]!["total_tokens"]!.GetValue<int>());
        (code, text, _) = await Send(http, HttpMethod.Post, "/v1/completions", Body(fits, true));
        Assert.Contains("\"finish_reason\":\"length\"", text);
    }

    [Fact]
    public void GenerateCliStopsAtTheContextAndRefusesLongerPrompts()
    {
        var tok = Tokenizer.Load(Fixtures.Model("llama"));
        var config = ModelConfig.Load(Fixtures.Model("llama"));
        string fits = LongPrompt(tok, config.MaxPositionEmbeddings - 5);
        var (code, stdout, stderr) = CliTests.RunCli("generate", "--model", Fixtures.Model("llama"), "--prompt", fits, "--max-new-tokens", "50", "--json", "--device", "cpu");
        Assert.True(code == 0, stderr);
        var doc = JsonNode.Parse(stdout)!;
        Assert.Equal(config.MaxPositionEmbeddings, doc["prompt_ids"]!.AsArray().Count + doc["output_ids"]!.AsArray().Count);
        Assert.Equal("length", doc["finish_reason"]!.GetValue<string>());

        (code, _, stderr) = CliTests.RunCli("generate", "--model", Fixtures.Model("llama"), "--prompt", LongPrompt(tok, config.MaxPositionEmbeddings + 3), "--device", "cpu");
        Assert.Equal(1, code);
        Assert.StartsWith("error: the prompt has", stderr);
        Assert.Single(stderr.Trim().Split('\n'));
    }

    [Fact]
    public void GenerateCliWithATinyTemperatureIsGreedy()
    {
        var greedy = CliTests.RunCli("generate", "--model", Fixtures.Model("qwen2"), "--prompt", "Hello", "--max-new-tokens", "6", "--json", "--device", "cpu");
        var tiny = CliTests.RunCli("generate", "--model", Fixtures.Model("qwen2"), "--prompt", "Hello", "--max-new-tokens", "6", "--json", "--device", "cpu",
            "--temperature", "1e-300", "--seed", "3");
        Assert.True(tiny.code == 0, tiny.stderr);
        Assert.Equal(greedy.stdout, tiny.stdout);
    }

    // ---- item 17: keys, logging, help ----

    [Fact]
    public async Task ANonLoopbackAddressWithoutAKeyIsRefused()
    {
        var e = await Assert.ThrowsAsync<LoraKitException>(() => OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen3"), Adapters = Fixtures.TempDir(), Host = "0.0.0.0", Port = 0, Device = "cpu",
        }));
        Assert.Contains("--insecure", e.Message);
    }

    [Fact]
    public async Task EachRequestLogsOneLine()
    {
        var lines = new System.Collections.Concurrent.ConcurrentQueue<string>();
        await using (var server = await Start(UserKey, null, log: lines.Enqueue))
        {
            using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
            await Send(http, HttpMethod.Post, "/v1/completions", "{\"model\":\"base\",\"prompt\":\"hi\",\"max_tokens\":3,\"ignore_eos\":true}", "Bearer " + UserKey);
            await Send(http, HttpMethod.Get, "/admin/adapters/../../etc", authorization: "Bearer " + UserKey);
        }
        var list = lines.ToList();
        Assert.Equal(2, list.Count);
        Assert.Matches(@"POST /v1/completions model=tiny status=200 prompt_tokens=\d+ completion_tokens=3 ms=\d+$", list[0]);
        Assert.Contains("status=404", list[1]);
    }

    [Fact]
    public void HelpCommandPrintsTheRootHelp()
    {
        var (code, stdout, stderr) = CliTests.RunCli("help");
        Assert.True(code == 0, stderr);
        Assert.Contains("serve", stdout);
        Assert.Contains("generate", stdout);
        (code, stdout, _) = CliTests.RunCli("help", "serve");
        Assert.Equal(0, code);
        Assert.Contains("--dtype <dtype>  ", stdout);
        Assert.Contains("[default: bf16 on CUDA, fp32 on CPU]", stdout); // the same form as System.CommandLine's own defaults
        Assert.Contains("[default: 127.0.0.1]", stdout);
    }

    // ---- item 3: SIGTERM ----

    [Fact]
    public async Task SigtermDrainsTheInFlightRequestAndExitsZero()
    {
        var (started, url, stderr) = await ServeProcess.StartAsync("--model", Fixtures.Model("qwen2"),
                     "--adapters", Fixtures.TempDir(), "--port", "0", "--device", "cpu", "--drain-seconds", "60");
        using var p = started;
        try
        {
            if (url is null) Assert.Fail("serve did not start: " + await stderr);
            // The request is in flight for certain: its body is half sent when SIGTERM arrives, the rest follows after.
            var uri = new Uri(url!);
            var body = Encoding.UTF8.GetBytes("{\"model\":\"base\",\"prompt\":\"Hello\",\"max_tokens\":64,\"ignore_eos\":true,\"temperature\":0}");
            using var tcp = new System.Net.Sockets.TcpClient();
            await tcp.ConnectAsync(uri.Host, uri.Port);
            var stream = tcp.GetStream();
            await stream.WriteAsync(Encoding.ASCII.GetBytes($"POST /v1/completions HTTP/1.1\r\nHost: {uri.Authority}\r\nContent-Type: application/json\r\nContent-Length: {body.Length}\r\n\r\n"));
            await stream.WriteAsync(body.AsMemory(0, 20));
            // In flight means being handled (a drain answers 503 to requests it has not begun): the server's own count says so.
            using (var probe = new HttpClient { BaseAddress = uri })
                for (var wait = Stopwatch.StartNew(); !(await probe.GetStringAsync("/metrics")).Contains("\nlorakit_http_requests_in_flight 2\n");)
                {
                    Assert.True(wait.Elapsed < TimeSpan.FromSeconds(30), "the half-sent request never reached the server");
                    await Task.Delay(20);
                }
            using (var kill = Process.Start("kill", ["-TERM", p.Id.ToString()])) kill.WaitForExit();
            await Task.Delay(500);
            Assert.False(p.HasExited, "serve exited with a request in flight");
            await stream.WriteAsync(body.AsMemory(20));
            stream.ReadTimeout = 60_000;
            var response = await new StreamReader(stream).ReadToEndAsync(); // the server closes the connection as it stops
            Assert.StartsWith("HTTP/1.1 200", response);
            Assert.Contains("\"finish_reason\":\"length\"", response);
            Assert.True(p.WaitForExit(30_000), "serve did not exit after SIGTERM");
            Assert.True(p.ExitCode == 0, await stderr);
            Assert.Contains("warning: no --api-key", await stderr);
        }
        finally { if (!p.HasExited) p.Kill(true); }
    }
}
