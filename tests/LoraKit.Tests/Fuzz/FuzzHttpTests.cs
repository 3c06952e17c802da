using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;
using LoraKit.Server;

namespace LoraKit.Tests.Fuzz;

/// <summary>One real server on loopback, with both keys, shared by the HTTP fuzz cases.</summary>
public sealed class FuzzServer : IAsyncLifetime
{
    public const string UserKey = "fuzz-user-key";
    public const string AdminKey = "fuzz-admin-key";
    public const long MaxBody = 65536;
    public OpenAiServer Server { get; private set; } = null!;
    public HttpClient Http { get; private set; } = null!;
    public string Adapters { get; private set; } = null!;
    /// <summary>The server's log (request lines and the full text of unexpected errors), to explain a 500.</summary>
    public System.Collections.Concurrent.ConcurrentQueue<string> ServerLog { get; } = new();

    public async Task InitializeAsync()
    {
        Adapters = ServerTests.AdapterRoot();
        var broken = Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", "a"), Path.Combine(Adapters, "broken"));
        File.WriteAllText(Path.Combine(broken, "adapter_config.json"), "{\"r\": \"eight\"");
        Server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen3"), Adapters = Adapters, Port = 0, ApiKey = UserKey, AdminKey = AdminKey, Device = "cpu",
            MaxTokens = 4, MaxBodyBytes = MaxBody, MaxPromptTokens = 200, MaxStopStrings = 4, ModelName = "tiny", Log = ServerLog.Enqueue,
        });
        // UTF-8 header values, so odd Authorization headers reach the server instead of being refused by the client.
        Http = new HttpClient(new SocketsHttpHandler { RequestHeaderEncodingSelector = (_, _) => Encoding.UTF8 })
            { BaseAddress = new Uri(Server.Url), Timeout = TimeSpan.FromSeconds(30) };
    }

    public async Task DisposeAsync()
    {
        Http.Dispose();
        await Server.DisposeAsync();
    }
}

/// <summary>
/// The HTTP API under malformed input (issue 16): every field of both completion endpoints × wrong types, truncated
/// and mutated bodies, content types, oversized bodies, odd Authorization headers, odd methods and paths. The contract:
/// never a 5xx, never an empty error body; an error is a 4xx with OpenAI's error object whose message is one clean line
/// (no server paths) and whose "param" names the field; a wrong key is never accepted.
/// </summary>
public class FuzzHttpTests(FuzzServer fx) : IClassFixture<FuzzServer>
{
    const string Area = "http";
    readonly List<string> _failures = [];

    static readonly string ChatBase = "{\"model\":\"base\",\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2,\"temperature\":0}";
    static readonly string CompletionBase = "{\"model\":\"base\",\"prompt\":\"Hello\",\"max_tokens\":2,\"temperature\":0}";

    static readonly string[] CompletionFields =
    [
        "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "stream_options", "ignore_eos",
        "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "echo", "best_of", "suffix", "user",
        "tools", "tool_choice", "response_format",
    ];

    static readonly string[] ChatFields =
    [
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
        "logprobs", "top_logprobs", "logit_bias", "user", "tools", "functions", "tool_choice", "response_format",
    ];

    /// <summary>Values of every JSON type and the edges of numbers, as JSON text.</summary>
    static readonly string[] WrongValues =
    [
        "null", "true", "false", "0", "1", "-1", "2", "1.5", "-0.0", "1e-300", "1e308", "-1e308", "1e400", "1180591620717411303424",
        "9223372036854775808", "-9223372036854775809", "\"\"", "\"x\"", "\"2\"", "\"true\"", "\"\\u0000\"", "[]", "[1]", "[\"a\"]", "[\"a\",5]",
        "[null]", "{}", "{\"a\":1}", "{\"include_usage\":\"yes\"}", "[[[[{}]]]]", "{\"type\":\"json_object\"}", "[{\"role\":\"user\"}]",
    ];

    async Task<(int code, string text, JsonNode? json)> Send(HttpRequestMessage req)
    {
        using var res = await fx.Http.SendAsync(req);
        var text = await res.Content.ReadAsStringAsync();
        JsonNode? json = null;
        if (res.Content.Headers.ContentType?.MediaType == "application/json")
            try { json = JsonNode.Parse(text); } catch (System.Text.Json.JsonException) { }
        return ((int)res.StatusCode, text, json);
    }

    static HttpRequestMessage Post(string path, string body, string? key = FuzzServer.UserKey, string contentType = "application/json")
    {
        var req = new HttpRequestMessage(HttpMethod.Post, path) { Content = new ByteArrayContent(Encoding.UTF8.GetBytes(body)) };
        req.Content.Headers.TryAddWithoutValidation("Content-Type", contentType);
        if (key != null) req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return req;
    }

    /// <summary>Judges one response against the contract and records it; failures are collected and asserted at the end.</summary>
    void Judge(string caseName, int code, string text, JsonNode? json, string? field = null, bool mustRefuse = false)
    {
        string? verdict = null;
        if (code >= 500) verdict = $"status {code}: {fx.ServerLog.LastOrDefault(l => l.StartsWith("error:", StringComparison.Ordinal))}";
        else if (code == 400 && text.Length == 0 && KestrelRejects(caseName))
            verdict = null; // not HTTP at all (a NUL in the request target): Kestrel answers 400 before any middleware runs
        else if (mustRefuse && code < 400) verdict = $"accepted with status {code}";
        else if (code >= 400)
        {
            var message = json?["error"]?["message"] is JsonValue m && m.GetValueKind() == System.Text.Json.JsonValueKind.String ? m.GetValue<string>() : null;
            if (message is null) verdict = $"status {code} without an OpenAI error object: '{Trunc(text)}'";
            else if (FuzzContract.JudgeMessage(message) is string bad) verdict = bad;
            else if (message.Contains(fx.Adapters) || message.Contains(Fixtures.Root) || message.Contains(Path.GetTempPath().TrimEnd('/')))
                verdict = $"message shows a server path: {message}";
            else if (field != null && code == 400 && !message.StartsWith("the request body is not valid JSON", StringComparison.Ordinal)
                     && !(json!["error"]!["param"] is JsonValue p && p.GetValue<string>().StartsWith(field, StringComparison.Ordinal)))
                verdict = $"param is {json["error"]!["param"]?.ToJsonString() ?? "null"}, not {field}: {message}";
        }
        FuzzContract.Record(Area, caseName, verdict is null ? (code < 400 ? "ok" : "clean-error") : "unclean", verdict ?? $"{code}");
        if (verdict != null) _failures.Add($"{caseName}: {verdict}");
    }

    /// <summary>Request targets that Kestrel refuses as malformed HTTP at the connection level (no application code runs).</summary>
    static bool KestrelRejects(string caseName) => caseName.Contains("%00", StringComparison.Ordinal);

    static string Trunc(string s) => s.Length > 300 ? s[..300] + "…" : s;

    void AssertAllClean(int cases)
    {
        Assert.True(cases > 0, "no cases were generated");
        Assert.True(_failures.Count == 0, $"{_failures.Count} of {cases} cases broke the contract:\n" + string.Join("\n", _failures.Take(40)));
    }

    static string WithField(string baseBody, string field, string valueJson)
    {
        var o = JsonNode.Parse(baseBody)!.AsObject();
        o[field] = JsonNode.Parse(valueJson, documentOptions: new System.Text.Json.JsonDocumentOptions { MaxDepth = 256 });
        return o.ToJsonString();
    }

    static string RawField(string baseBody, string field, string rawJson) =>
        baseBody[..^1] + $",\"{field}\":{rawJson}}}"; // raw, so 1e400 and 2^70 reach the server as the client wrote them

    [Fact]
    public async Task EveryFieldOfBothEndpointsWithEveryWrongTypeIsAClean4xxOrWorks()
    {
        int n = 0;
        foreach (var (path, baseBody, fields) in new[] { ("/v1/completions", CompletionBase, CompletionFields), ("/v1/chat/completions", ChatBase, ChatFields) })
            foreach (var field in fields)
                foreach (var value in WrongValues)
                {
                    string body = JsonNode.Parse(baseBody)!.AsObject().ContainsKey(field) ? WithFieldRaw(baseBody, field, value) : RawField(baseBody, field, value);
                    var (code, text, json) = await Send(Post(path, body));
                    Judge($"{path} {field}={value}", code, text, json, field);
                    n++;
                }
        AssertAllClean(n);
    }

    /// <summary>Replaces an existing field's value textually (keeps raw number spellings).</summary>
    static string WithFieldRaw(string baseBody, string field, string rawJson)
    {
        var o = JsonNode.Parse(baseBody)!.AsObject();
        o.Remove(field);
        return RawField(o.ToJsonString(), field, rawJson);
    }

    [Fact]
    public async Task EveryMessageFieldWithEveryWrongTypeIsAClean4xxOrWorks()
    {
        int n = 0;
        foreach (var field in new[] { "role", "content", "name" })
            foreach (var value in WrongValues.Concat(["\"robot\"", "[{\"type\":\"image_url\"}]", "[{\"type\":\"text\",\"text\":5}]", "[{\"type\":\"text\",\"text\":\"hi\"}]"]))
            {
                var body = JsonNode.Parse(ChatBase)!.AsObject();
                var message = body["messages"]![1]!.AsObject();
                message[field] = JsonNode.Parse(value);
                var (code, text, json) = await Send(Post("/v1/chat/completions", body.ToJsonString()));
                Judge($"messages[1].{field}={value}", code, text, json, "messages");
                n++;
            }
        foreach (var value in WrongValues)
        {
            var body = RawField(ChatBase.Replace("\"max_tokens\":2,", "").Replace(",\"temperature\":0", ""), "stream_options", $"{{\"include_usage\":{value}}}");
            var (code, text, json) = await Send(Post("/v1/chat/completions", body));
            Judge($"stream_options.include_usage={value}", code, text, json, "stream_options");
            n++;
        }
        AssertAllClean(n);
    }

    [Fact]
    public async Task TruncatedAndMutatedBodiesAreClean400s()
    {
        int n = 0;
        foreach (var (path, baseBody) in new[] { ("/v1/completions", CompletionBase), ("/v1/chat/completions", ChatBase) })
        {
            var bytes = Encoding.UTF8.GetBytes(baseBody);
            int step = Math.Max(1, 4 / FuzzContract.Scale);
            for (int cut = 0; cut < bytes.Length; cut += step)
            {
                var (code, text, json) = await Send(Post(path, baseBody[..cut]));
                Judge($"{path} truncated at {cut}", code, text, json);
                if (code < 400) _failures.Add($"{path} truncated at {cut}: accepted");
                n++;
            }
            var rng = FuzzContract.Rng("http-mutations" + path);
            for (int k = 0; k < 40 * FuzzContract.Scale; k++)
            {
                var b = (byte[])bytes.Clone();
                for (int flips = rng.Next(1, 4); flips > 0; flips--) b[rng.Next(b.Length)] = (byte)rng.Next(256);
                using var req = new HttpRequestMessage(HttpMethod.Post, path) { Content = new ByteArrayContent(b) };
                req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", FuzzServer.UserKey);
                var (code, text, json) = await Send(req);
                Judge($"{path} mutation {k}", code, text, json);
                n++;
            }
            foreach (var odd in new[] { "", " ", "null", "[]", "\"x\"", "5", "{}", "{\"model\":\"base\"}", "{\"a\":1}{\"b\":2}", "\uFEFF" + baseBody,
                         new string('[', 5000), baseBody.Replace("\"base\"", "\"ba\\ud800se\""), baseBody + "garbage",
                         "{\"model\":\"base\",\"model\":\"a\"}", baseBody.Replace("\"model\"", "\"MODEL\"") })
            {
                var (code, text, json) = await Send(Post(path, odd));
                Judge($"{path} body {Trunc(odd)}", code, text, json);
                n++;
            }
            byte[] invalidUtf8 = [.. Encoding.UTF8.GetBytes(baseBody[..^1] + ",\"user\":\""), 0xFF, 0xFE, .. "\"}"u8.ToArray()];
            using (var req = new HttpRequestMessage(HttpMethod.Post, path) { Content = new ByteArrayContent(invalidUtf8) })
            {
                req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", FuzzServer.UserKey);
                var (code, text, json) = await Send(req);
                Judge($"{path} invalid UTF-8", code, text, json);
                n++;
            }
        }
        AssertAllClean(n);
    }

    [Fact]
    public async Task ContentTypesSizesAndChunkingAreHandled()
    {
        int n = 0;
        foreach (var ct in new[] { "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=utf-16", "", "garbage" })
        {
            var (code, text, json) = await Send(Post("/v1/completions", CompletionBase, contentType: ct));
            Judge($"content-type '{ct}'", code, text, json);
            n++;
        }
        // Over the body limit, with and without a Content-Length.
        var huge = RawField(CompletionBase, "user", "\"" + new string('x', (int)FuzzServer.MaxBody) + "\"");
        var (c1, t1, j1) = await Send(Post("/v1/completions", huge));
        Judge("oversized body", c1, t1, j1);
        if (c1 != 413) _failures.Add($"oversized body: {c1}, not 413");
        using (var req = new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = new StreamContent(new MemoryStream(Encoding.UTF8.GetBytes(huge))) })
        {
            req.Headers.TransferEncodingChunked = true;
            req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", FuzzServer.UserKey);
            var (code, text, json) = await Send(req);
            Judge("oversized chunked body", code, text, json);
            if (code != 413) _failures.Add($"oversized chunked body: {code}, not 413");
        }
        // A prompt that is large in characters but under the byte limit: refused for its token count, not a crash.
        var longPrompt = WithField(CompletionBase, "prompt", "\"" + string.Join(" ", Enumerable.Repeat("word", 6000)) + "\"");
        var (c2, t2, j2) = await Send(Post("/v1/completions", longPrompt));
        Judge("long prompt", c2, t2, j2, "prompt");
        n += 4;
        AssertAllClean(n);
    }

    [Fact]
    public async Task OnlyTheRightKeyIsAcceptedWhateverTheHeaderLooksLike()
    {
        int n = 0;
        string u = FuzzServer.UserKey, a = FuzzServer.AdminKey;
        // (header values, accepted on user routes, accepted on admin routes)
        var cases = new List<(string[] headers, bool user, bool admin)>
        {
            ([], false, false), ([""], false, false), (["Bearer"], false, false), (["Bearer "], false, false), (["Bearer  "], false, false),
            ([$"Bearer {u}"], true, false), ([$"bearer {u}"], true, false), ([$"BEARER {u}"], true, false), ([$"Bearer\t{u}"], true, false),
            ([$"Bearer   {u}  "], true, false), ([$"Bearer {a}"], true, true), ([$"bEaReR {a}"], true, true),
            ([$"Bearer {u.ToUpperInvariant()}"], false, false), ([$"Bearer {u}x"], false, false), ([$"Bearer {u[..^1]}"], false, false),
            ([$"Bearer {u} {u}"], false, false), ([$"Bearer {a}{u}"], false, false), ([$"Basic {u}"], false, false), ([$"Token {a}"], false, false),
            ([u], false, false), ([a], false, false), ([$"Bearer{u}"], false, false), ([$"Bearer \"{u}\""], false, false),
            ([$"Bearer {u}", $"Bearer {a}"], false, false), ([$"Bearer {a}", "Bearer nope"], false, false), ([$"Bearer {u}\u00e9"], false, false),
            ([$"Bearer {new string('k', 8000)}"], false, false), ([$"Bearer {u},Bearer {a}"], false, false),
        };
        var routes = new (HttpMethod m, string path, bool admin)[]
        {
            (HttpMethod.Get, "/v1/models", false), (HttpMethod.Get, "/V1/Models", false), (HttpMethod.Get, "/admin/adapters", true),
            (HttpMethod.Get, "/ADMIN/ADAPTERS", true), (HttpMethod.Get, "/Admin/adapters/", true), (HttpMethod.Delete, "/ADMIN/adapters/zzz", true),
            (HttpMethod.Post, "/aDmIn/adapters/zzz/load", true), (HttpMethod.Get, "/no/such/route", false),
        };
        foreach (var (m, path, admin) in routes)
            foreach (var (headers, user, adm) in cases)
            {
                using var req = new HttpRequestMessage(m, path);
                if (m == HttpMethod.Post) req.Content = new StringContent("{}", Encoding.UTF8, "application/json");
                foreach (var h in headers) req.Headers.TryAddWithoutValidation("Authorization", h);
                var (code, text, json) = await Send(req);
                bool accepted = admin ? adm : user;
                string name = $"{m} {path} Authorization=[{Trunc(string.Join(" | ", headers))}]";
                Judge(name, code, text, json, mustRefuse: !accepted);
                if (!accepted && code is not (401 or 403)) _failures.Add($"{name}: {code}, not 401/403");
                if (accepted && code is 401 or 403) _failures.Add($"{name}: refused the right key ({code})");
                n++;
            }
        AssertAllClean(n);
    }

    [Fact]
    public async Task OddMethodsPathsAndAdapterNamesAreClean()
    {
        int n = 0;
        var names = new[] { "a", "regex", "broken", "llama-adapter", "escape", "nope", "..", ".", "%2e%2e", "a%2Fb", "..%2F..%2Fetc", "%00", "a b",
            new string('n', 300), "\u00e9t\u00e9", "CON", "a.b", "-a", "a..b", "%252e" };
        foreach (var name in names)
            foreach (var (m, suffix) in new[] { (HttpMethod.Post, "/load"), (HttpMethod.Post, "/reload"), (HttpMethod.Delete, "") })
            {
                using var req = new HttpRequestMessage(m, $"/admin/adapters/{name}{suffix}");
                if (m == HttpMethod.Post) req.Content = new StringContent("", Encoding.UTF8, "application/json");
                req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", FuzzServer.AdminKey);
                var (code, text, json) = await Send(req);
                Judge($"{m} /admin/adapters/{Trunc(name)}{suffix}", code, text, json);
                n++;
            }
        foreach (var name in names)
        {
            var (code, text, json) = await Send(Post("/v1/completions", WithField(CompletionBase, "model", System.Text.Json.JsonSerializer.Serialize(Uri.UnescapeDataString(name)))));
            Judge($"model={Trunc(name)}", code, text, json, "model");
            n++;
        }
        foreach (var m in new[] { HttpMethod.Get, HttpMethod.Put, HttpMethod.Patch, HttpMethod.Delete, HttpMethod.Options, new HttpMethod("BREW") })
            foreach (var path in new[] { "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/admin/adapters", "/", "/v1", "/v1/completions/x" })
            {
                using var req = new HttpRequestMessage(m, path);
                req.Headers.Authorization = new AuthenticationHeaderValue("Bearer", FuzzServer.AdminKey);
                var (code, text, json) = await Send(req);
                Judge($"{m} {path}", code, text, json);
                n++;
            }
        AssertAllClean(n);
    }
}
