using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using LoraKit.Server;

namespace LoraKit.Tests.Fuzz;

/// <summary>A real server on loopback for hostile clients: small queue, long generations, both keys.</summary>
public sealed class HostileServer : IAsyncLifetime
{
    public const string UserKey = "hostile-user-key";
    public const string AdminKey = "hostile-admin-key";
    public const int MaxConcurrent = 2, MaxQueued = 2;
    public OpenAiServer Server { get; private set; } = null!;
    public Uri Uri { get; private set; } = null!;
    public string Adapters { get; private set; } = null!;
    public System.Collections.Concurrent.ConcurrentQueue<string> ServerLog { get; } = new();

    public async Task InitializeAsync()
    {
        Adapters = ServerTests.AdapterRoot();
        var broken = Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", "a"), Path.Combine(Adapters, "corrupt"));
        var weights = Path.Combine(broken, "adapter_model.safetensors");
        File.WriteAllBytes(weights, File.ReadAllBytes(weights)[..40]); // a truncated safetensors file
        File.WriteAllText(Path.Combine(Adapters, "plainfile"), "not an adapter");
        Server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen3"), Adapters = Adapters, Port = 0, ApiKey = UserKey, AdminKey = AdminKey, Device = "cpu",
            MaxTokens = 200, MaxBodyBytes = 65536, MaxPromptTokens = 200, MaxConcurrent = MaxConcurrent, MaxQueued = MaxQueued,
            ModelName = "tiny", Log = ServerLog.Enqueue, BodyTimeout = TimeSpan.FromSeconds(2),
        });
        Uri = new Uri(Server.Url);
    }

    public async Task DisposeAsync() => await Server.DisposeAsync();
}

/// <summary>
/// The server against hostile clients (issue 16, second pass): raw sockets that hang up mid-stream or mid-body, trickle
/// bodies, send malformed chunked framing, HTTP/1.0, duplicate or non-ASCII Authorization headers, odd methods on every
/// route, adapter names that try to leave the adapters directory, and adapters loaded and unloaded while requests use
/// them. The contract: never a 5xx, never an empty error body from our code, never a wrong key accepted, the engine keeps
/// serving (a later request answers 200) and adapter leases are released (unload succeeds afterwards).
/// </summary>
public class FuzzHttpHostileTests(HostileServer fx) : IClassFixture<HostileServer>
{
    const string Area = "http-hostile";
    readonly List<string> _failures = [];
    int _cases;

    static string Completion(string model, int maxTokens, bool stream = false) =>
        $"{{\"model\":\"{model}\",\"prompt\":\"Hello there\",\"max_tokens\":{maxTokens},\"temperature\":0,\"ignore_eos\":true,\"stream\":{(stream ? "true" : "false")}}}";

    static byte[] RawPost(string path, string body, string? key = HostileServer.UserKey, string version = "HTTP/1.1", string extraHeaders = "")
    {
        var b = Encoding.UTF8.GetBytes(body);
        var auth = key is null ? "" : $"Authorization: Bearer {key}\r\n";
        return [.. Encoding.UTF8.GetBytes($"POST {path} {version}\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {b.Length}\r\nConnection: close\r\n{extraHeaders}\r\n"), .. b];
    }

    /// <summary>Sends raw bytes, reads the whole answer (the request asks the server to close); bounded by a timeout.</summary>
    async Task<(int code, string headers, string body)> Raw(byte[] request, int timeoutMs = 15_000)
    {
        using var tcp = new TcpClient();
        await tcp.ConnectAsync(fx.Uri.Host, fx.Uri.Port);
        var s = tcp.GetStream();
        await s.WriteAsync(request);
        // No half-close: Kestrel takes a FIN as the client going away. Every request asks the server to close instead.
        using var cts = new CancellationTokenSource(timeoutMs);
        var buf = new MemoryStream();
        try { await s.CopyToAsync(buf, cts.Token); }
        catch (OperationCanceledException) { }
        catch (IOException) { }
        var bytes = buf.ToArray();
        int sep = bytes.AsSpan().IndexOf("\r\n\r\n"u8);
        var head = Encoding.ASCII.GetString(bytes, 0, sep < 0 ? bytes.Length : sep);
        var body = sep < 0 ? [] : bytes[(sep + 4)..];
        if (head.Contains("Transfer-Encoding: chunked", StringComparison.OrdinalIgnoreCase)) body = Dechunk(body);
        int code = head.Length >= 12 && int.TryParse(head.AsSpan(9, 3), out var c) ? c : 0;
        return (code, head, Encoding.UTF8.GetString(body));
    }

    static byte[] Dechunk(byte[] s)
    {
        var o = new MemoryStream();
        int i = 0;
        while (i < s.Length)
        {
            int nl = s.AsSpan(i).IndexOf("\r\n"u8);
            if (nl < 0 || !int.TryParse(Encoding.ASCII.GetString(s, i, nl), System.Globalization.NumberStyles.HexNumber, null, out var n) || n == 0) break;
            int start = i + nl + 2;
            o.Write(s, start, Math.Min(n, s.Length - start));
            i = start + n + 2;
        }
        return o.ToArray();
    }

    /// <summary>
    /// Judges one answer. kestrelLevel: malformed HTTP that Kestrel itself refuses before any middleware runs (an empty
    /// 400 is all it can say). wrongKey: the request carried no valid key, so it must not succeed.
    /// </summary>
    void Judge(string name, int code, string body, bool kestrelLevel = false, bool wrongKey = false, int[]? expect = null)
    {
        _cases++;
        string? verdict = null;
        if (code == 0) verdict = "no HTTP answer";
        else if (kestrelLevel && body.Length == 0 && code is 400 or 431 or 505) verdict = null; // Kestrel's own refusal: a status line, no body
        else if (code >= 500) verdict = $"status {code}: {fx.ServerLog.LastOrDefault(l => l.StartsWith("error:", StringComparison.Ordinal))}";
        else if (wrongKey && code < 400) verdict = $"a wrong key was accepted ({code})";
        else if (expect != null && !expect.Contains(code)) verdict = $"status {code}, expected {string.Join("/", expect)}: {Trunc(body)}";
        else if (code >= 400 && !(kestrelLevel && body.Length == 0))
        {
            string? message = null;
            try { message = JsonNode.Parse(body)?["error"]?["message"]?.GetValue<string>(); } catch (Exception) { }
            if (message is null) verdict = $"status {code} without an OpenAI error object: '{Trunc(body)}'";
            else if (FuzzContract.JudgeMessage(message) is string bad) verdict = bad;
            else if (message.Contains(fx.Adapters) || message.Contains(Fixtures.Root) || message.Contains(Path.GetTempPath().TrimEnd('/')))
                verdict = $"message shows a server path: {message}";
        }
        FuzzContract.Record(Area, name, verdict is null ? (code < 400 ? "ok" : "clean-error") : "unclean", verdict ?? $"{code}");
        if (verdict != null) _failures.Add($"{name}: {verdict}");
    }

    static string Trunc(string s) => s.Length > 300 ? s[..300] + "…" : s;

    void AssertAllClean() =>
        Assert.True(_failures.Count == 0, $"{_failures.Count} of {_cases} cases broke the contract:\n" + string.Join("\n", _failures.Take(40)));

    /// <summary>Opens a stream, reads until the first token event arrives, then drops the connection.</summary>
    async Task AbortMidStream(string model)
    {
        using var tcp = new TcpClient();
        await tcp.ConnectAsync(fx.Uri.Host, fx.Uri.Port);
        var s = tcp.GetStream();
        await s.WriteAsync(RawPost("/v1/completions", Completion(model, 200, stream: true)));
        var buf = new byte[4096];
        var seen = new StringBuilder();
        using var cts = new CancellationTokenSource(15_000);
        while (!seen.ToString().Contains("data: {", StringComparison.Ordinal))
        {
            int n = await s.ReadAsync(buf, cts.Token);
            if (n == 0) break;
            seen.Append(Encoding.UTF8.GetString(buf, 0, n));
        }
        tcp.Client.LingerState = new LingerOption(true, 0); // a reset, as a crashed client would
        tcp.Close();
    }

    internal Task AbortMidStreamPublic(string model) => AbortMidStream(model);

    internal async Task CompletePublic(string model, bool stream)
    {
        var (code, _, body) = await Raw(RawPost("/v1/completions", Completion(model, 8, stream)));
        Assert.True(code == 200, $"{model}: {code} {body}");
    }

    async Task<int> Admin(HttpMethod method, string path)
    {
        var req = RawRequest(method.Method, path, HostileServer.AdminKey);
        var (code, _, body) = await Raw(req);
        Judge($"admin {method} {path}", code, body, expect: [200, 404, 409]);
        return code;
    }

    static byte[] RawRequest(string method, string path, string? key, string body = "")
    {
        var b = Encoding.UTF8.GetBytes(body);
        var auth = key is null ? "" : $"Authorization: Bearer {key}\r\n";
        var len = method is "GET" or "HEAD" or "DELETE" or "OPTIONS" or "TRACE" && b.Length == 0 ? "" : $"Content-Length: {b.Length}\r\n";
        return [.. Encoding.UTF8.GetBytes($"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{len}Connection: close\r\n\r\n"), .. b];
    }

    /// <summary>Unloads until it succeeds: in-flight requests may hold the adapter for a moment (409), never for long.</summary>
    async Task UnloadEventually(string name)
    {
        var until = DateTime.UtcNow.AddSeconds(10);
        int code;
        do { code = await Admin(HttpMethod.Delete, $"/admin/adapters/{name}"); if (code == 409) await Task.Delay(50); }
        while (code == 409 && DateTime.UtcNow < until);
        Assert.True(code is 200 or 404, $"unloading '{name}' still answers {code} after 10 s: a lease was never released");
    }

    async Task AssertServes(string model)
    {
        var (code, _, body) = await Raw(RawPost("/v1/completions", Completion(model, 3)));
        Judge($"serves {model}", code, body, expect: [200]);
    }

    [Fact]
    public async Task StreamsDroppedMidwayReleaseTheirSlotAndLeaseAndTheAdapterCanBeUnloadedAtOnce()
    {
        int rounds = 6 * FuzzContract.Scale;
        for (int i = 0; i < rounds; i++)
        {
            await AbortMidStream("a");
            // Unload at once: the dropped stream's row may still sit in the engine's batch.
            await UnloadEventually("a");
            await AssertServes("a");
        }
        // Many at once, all dropped: the queue and every slot must come back.
        await Task.WhenAll(Enumerable.Range(0, HostileServer.MaxConcurrent + HostileServer.MaxQueued).Select(k => AbortMidStream(k % 2 == 0 ? "a" : "base")));
        await UnloadEventually("a");
        for (int i = 0; i < HostileServer.MaxConcurrent + HostileServer.MaxQueued + 1; i++) await AssertServes(i % 2 == 0 ? "a" : "base");
        AssertAllClean();
    }

    [Fact]
    public async Task ClientsThatHangUpMidBodyLeaveNothingBehind()
    {
        var full = RawPost("/v1/completions", Completion("a", 3));
        int cuts = 0;
        for (int cut = 10; cut < full.Length; cut += Math.Max(1, full.Length / (8 * FuzzContract.Scale)))
        {
            using var tcp = new TcpClient();
            await tcp.ConnectAsync(fx.Uri.Host, fx.Uri.Port);
            await tcp.GetStream().WriteAsync(full.AsMemory(0, cut));
            tcp.Client.LingerState = new LingerOption(true, 0);
            tcp.Close();
            cuts++;
        }
        await Task.Delay(200);
        for (int i = 0; i < HostileServer.MaxConcurrent + HostileServer.MaxQueued + 1; i++) await AssertServes("base");
        Assert.True(cuts > 4);
        AssertAllClean();
    }

    [Fact]
    public async Task ClientsTricklingTheirBodyDoNotTakeTheQueueFromOthers()
    {
        // More slow clients than slots and queue together: each sends headers and a few bytes of its body, then waits.
        var slow = new List<TcpClient>();
        try
        {
            var req = RawPost("/v1/completions", Completion("base", 3));
            for (int i = 0; i < HostileServer.MaxConcurrent + HostileServer.MaxQueued + 2; i++)
            {
                var tcp = new TcpClient();
                slow.Add(tcp);
                await tcp.ConnectAsync(fx.Uri.Host, fx.Uri.Port);
                await tcp.GetStream().WriteAsync(req.AsMemory(0, req.Length - 20));
            }
            await Task.Delay(300);
            await AssertServes("base");
        }
        finally { foreach (var t in slow) t.Dispose(); }
        AssertAllClean();
    }

    [Fact]
    public async Task IdleConnectionsAndPipelinedRequestsLeaveTheServerResponsive()
    {
        var idle = new List<TcpClient>();
        try
        {
            for (int i = 0; i < 150 * FuzzContract.Scale; i++)
            {
                var t = new TcpClient();
                idle.Add(t);
                await t.ConnectAsync(fx.Uri.Host, fx.Uri.Port);
                if (i % 3 == 1) await t.GetStream().WriteAsync("POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "u8.ToArray()); // headers never end
            }
            var sw = System.Diagnostics.Stopwatch.StartNew();
            await AssertServes("base");
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5), $"a request took {sw.Elapsed.TotalSeconds:F1} s next to {idle.Count} idle connections");
        }
        finally { foreach (var t in idle) t.Dispose(); }
        // Pipelined on one keep-alive connection: an error in the middle must not desynchronise the rest.
        string Req(string method, string path, string body, bool close = false) =>
            $"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {HostileServer.UserKey}\r\nContent-Type: application/json\r\n" +
            $"Content-Length: {Encoding.UTF8.GetByteCount(body)}\r\n{(close ? "Connection: close\r\n" : "")}\r\n{body}";
        var pipelined = Req("GET", "/health", "") + Req("POST", "/v1/completions", "{\"model\":") + Req("POST", "/v1/completions", "{\"model\":\"nope\",\"prompt\":\"x\"}")
            + Req("GET", "/v1/models", "") + Req("POST", "/v1/completions", Completion("base", 2), close: true);
        var (code, _, _) = await Raw(Encoding.UTF8.GetBytes(pipelined));
        using (var tcp = new TcpClient())
        {
            await tcp.ConnectAsync(fx.Uri.Host, fx.Uri.Port);
            var st = tcp.GetStream();
            await st.WriteAsync(Encoding.UTF8.GetBytes(pipelined));
            using var cts = new CancellationTokenSource(15_000);
            var all = new MemoryStream();
            try { await st.CopyToAsync(all, cts.Token); } catch (OperationCanceledException) { } catch (IOException) { }
            var text = Encoding.UTF8.GetString(all.ToArray());
            var statuses = System.Text.RegularExpressions.Regex.Matches(text, @"HTTP/1\.1 (\d{3})").Select(m => m.Groups[1].Value).ToList();
            Judge("pipelined", code, "{\"error\":{\"message\":\"x\"}}", expect: [200]);
            Judge("pipelined statuses " + string.Join(",", statuses), string.Join(",", statuses) == "200,400,404,200,200" ? 200 : 418, text, expect: [200]);
        }
        AssertAllClean();
    }

    [Fact]
    public async Task StalledBodiesAreBoundedInNumberAndTime()
    {
        int gate = 4 * (HostileServer.MaxConcurrent + HostileServer.MaxQueued);
        var stalled = new List<TcpClient>();
        try
        {
            foreach (var path in new[] { "/v1/completions", "/v1/classify" })
            {
                var req = RawPost(path, Completion("base", 3));
                for (int i = 0; i < gate; i++)
                {
                    var t = new TcpClient();
                    stalled.Add(t);
                    await t.ConnectAsync(fx.Uri.Host, fx.Uri.Port);
                    await t.GetStream().WriteAsync(req.AsMemory(0, req.Length - 10));
                }
                await Task.Delay(300);
                // Every place for a body is taken: the next is refused at once, with a reason.
                var sw = System.Diagnostics.Stopwatch.StartNew();
                var (code, _, body) = await Raw(RawPost(path, Completion("base", 3)));
                Judge($"gate full {path}", code, body, expect: [429]);
                Assert.True(sw.Elapsed < TimeSpan.FromSeconds(2), $"the refusal took {sw.Elapsed.TotalSeconds:F1} s");
                // The stalled ones run out of time (BodyTimeout 2 s here) with a 408 and an error object.
                using var cts = new CancellationTokenSource(10_000);
                var first = stalled[^1].GetStream();
                var got = new MemoryStream();
                try { await first.CopyToAsync(got, cts.Token); } catch (OperationCanceledException) { } catch (IOException) { }
                var text = Encoding.UTF8.GetString(got.ToArray());
                int sep = text.IndexOf("\r\n\r\n", StringComparison.Ordinal);
                var answer = sep < 0 ? "" : Encoding.UTF8.GetString(Dechunk(Encoding.UTF8.GetBytes(text[(sep + 4)..])));
                Judge($"stalled body {path}", text.Length >= 12 && int.TryParse(text.AsSpan(9, 3), out var c) ? c : 0, answer, expect: [408]);
                foreach (var t in stalled) t.Dispose();
                stalled.Clear();
                await AssertServes("base");
            }
        }
        finally { foreach (var t in stalled) t.Dispose(); }
        AssertAllClean();
    }

    [Fact]
    public async Task AdaptersLoadedReloadedAndUnloadedUnderLoadNeverGiveA500()
    {
        int rounds = 4 * FuzzContract.Scale;
        var load = Task.Run(async () =>
        {
            for (int i = 0; i < rounds * 3; i++)
            {
                var (code, _, body) = await Raw(RawPost("/v1/completions", Completion(i % 3 == 0 ? "regex" : "a", 4, stream: i % 2 == 0)));
                lock (_failures) Judge($"load {i}", code, body, expect: [200, 429]);
            }
        });
        for (int i = 0; i < rounds; i++)
            foreach (var (m, p) in new[] { ("POST", "/admin/adapters/a/load"), ("POST", "/admin/adapters/a/reload"), ("DELETE", "/admin/adapters/a"),
                                           ("POST", "/admin/adapters/regex/reload"), ("DELETE", "/admin/adapters/regex"), ("POST", "/admin/adapters/corrupt/load") })
            {
                var (code, _, body) = await Raw(RawRequest(m, p, HostileServer.AdminKey));
                lock (_failures) Judge($"admin {m} {p} #{i}", code, body, expect: [200, 404, 409, 422]);
            }
        await load;
        AssertAllClean();
    }

    [Fact]
    public async Task MalformedHttpFramingAndHeaders()
    {
        var body = Completion("base", 2);
        var b = Encoding.UTF8.GetBytes(body);
        string Head(string extra) => $"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {HostileServer.UserKey}\r\nContent-Type: application/json\r\nConnection: close\r\n{extra}\r\n";
        var chunkedHead = Head("Transfer-Encoding: chunked\r\n");
        var cases = new List<(string name, byte[] req, bool kestrel, bool wrongKey)>
        {
            ("chunked ok", Encoding.UTF8.GetBytes(chunkedHead + $"{b.Length:x}\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked bad size", Encoding.UTF8.GetBytes(chunkedHead + $"zz\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked size too big", Encoding.UTF8.GetBytes(chunkedHead + $"ffff\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked size too small", Encoding.UTF8.GetBytes(chunkedHead + $"3\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked huge size", Encoding.UTF8.GetBytes(chunkedHead + $"ffffffffffffffffff\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked no terminator", Encoding.UTF8.GetBytes(chunkedHead + $"{b.Length:x}\r\n{body}\r\n"), false, false),
            ("chunked huge size classify", Encoding.UTF8.GetBytes(chunkedHead.Replace("/v1/completions", "/v1/classify") + $"ffffffffffffffffff\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked negative", Encoding.UTF8.GetBytes(chunkedHead + $"-5\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked extension", Encoding.UTF8.GetBytes(chunkedHead + $"{b.Length:x};x=\"y\r\n{body}\r\n0\r\n\r\n"), false, false),
            ("chunked over the limit", Encoding.UTF8.GetBytes(chunkedHead + string.Concat(Enumerable.Repeat($"{4096:x}\r\n{new string(' ', 4096)}\r\n", 20)) + "0\r\n\r\n"), false, false),
            ("TE and CL", Encoding.UTF8.GetBytes(Head($"Transfer-Encoding: chunked\r\nContent-Length: {b.Length}\r\n") + $"{b.Length:x}\r\n{body}\r\n0\r\n\r\n"), true, false),
            ("TE gzip", Encoding.UTF8.GetBytes(Head("Transfer-Encoding: gzip\r\n") + body), true, false),
            ("CL not a number", Encoding.UTF8.GetBytes(Head("Content-Length: abc\r\n") + body), true, false),
            ("CL twice", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\nContent-Length: 5\r\n") + body), true, false),
            ("CL longer than body", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length + 50}\r\n") + body), false, false),
            ("HTTP/1.0", RawPost("/v1/completions", body, version: "HTTP/1.0"), false, false),
            ("HTTP/0.9-ish", Encoding.UTF8.GetBytes("GET /health\r\n\r\n"), true, false),
            ("HTTP/2.0 text", RawPost("/v1/completions", body, version: "HTTP/2.0"), true, false),
            ("HTTP/1.1 no Host", Encoding.UTF8.GetBytes($"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer {HostileServer.UserKey}\r\nContent-Length: {b.Length}\r\nConnection: close\r\n\r\n{body}"), true, false),
            ("absolute-form target", Encoding.UTF8.GetBytes($"POST http://127.0.0.1/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {HostileServer.UserKey}\r\nContent-Length: {b.Length}\r\nConnection: close\r\n\r\n{body}"), false, false),
            ("asterisk target", Encoding.UTF8.GetBytes("OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), true, true),
            ("header without colon", Encoding.UTF8.GetBytes(Head("garbage\r\n") + body), true, false),
            ("obsolete line folding", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\nX-A: a\r\n b\r\n") + body), true, false),
            ("huge header", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\nX-Big: {new string('a', 40_000)}\r\n") + body), true, false),
            ("10k headers", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\n" + string.Concat(Enumerable.Range(0, 10_000).Select(i => $"X-{i}: 1\r\n"))) + body), true, false),
            ("expect 100-continue", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\nExpect: 100-continue\r\n") + body), false, false),
            ("expect other", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\nExpect: 42-nonsense\r\n") + body), true, false),
            ("content-encoding gzip not gzip", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\nContent-Encoding: gzip\r\n") + body), false, false),
            ("upgrade h2c", Encoding.UTF8.GetBytes(Head($"Content-Length: {b.Length}\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n") + body), false, false),
        };
        // Authorization oddities: none of them carries the right key alone.
        string Auth(string header) => $"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}Content-Type: application/json\r\nContent-Length: {b.Length}\r\nConnection: close\r\n\r\n{body}";
        foreach (var (name, header) in new[]
        {
            ("duplicate Authorization (right, wrong)", $"Authorization: Bearer {HostileServer.UserKey}\r\nAuthorization: Bearer nope\r\n"),
            ("duplicate Authorization (wrong, right)", $"Authorization: Bearer nope\r\nAuthorization: Bearer {HostileServer.UserKey}\r\n"),
            ("comma-joined Authorization", $"Authorization: Bearer nope, Bearer {HostileServer.UserKey}\r\n"),
            ("key with a NUL", $"Authorization: Bearer {HostileServer.UserKey}\0\r\n"),
            ("key prefix", $"Authorization: Bearer {HostileServer.UserKey[..^1]}\r\n"),
            ("key plus a char", $"Authorization: Bearer {HostileServer.UserKey}x\r\n"),
            ("key inner space", $"Authorization: Bearer hostile user-key\r\n"),
            ("Basic scheme", $"Authorization: Basic {Convert.ToBase64String(Encoding.UTF8.GetBytes(HostileServer.UserKey))}\r\n"),
            ("scheme only", "Authorization: Bearer\r\n"),
            ("key only", $"Authorization: {HostileServer.UserKey}\r\n"),
            ("non-ASCII key", "Authorization: Bearer hostile-üser-key\r\n"),
            ("Latin-1 bytes", "Authorization: Bearer \u00ff\u00fe\r\n"),
            ("Proxy-Authorization", $"Proxy-Authorization: Bearer {HostileServer.UserKey}\r\n"),
            ("X-Api-Key", $"X-Api-Key: {HostileServer.UserKey}\r\n"),
            ("lower-case header name", $"authorization: bearer nope\r\n"),
        })
            cases.Add((name, Encoding.UTF8.GetBytes(Auth(header)), name is "key with a NUL" or "Latin-1 bytes" or "non-ASCII key", true));
        // Every method on every route, with the admin key (auth passes, so the method is what is judged) and without.
        var routes = new[] { "/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify", "/admin/adapters", "/admin/adapters/a/load", "/admin/adapters/a/reload", "/admin/adapters/a" };
        foreach (var route in routes)
            foreach (var method in new[] { "GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT", "POST", "FOO" })
            {
                if (method == "CONNECT") { cases.Add(($"{method} {route}", RawRequest(method, route, HostileServer.AdminKey), true, false)); continue; }
                cases.Add(($"{method} {route} admin", RawRequest(method, route, HostileServer.AdminKey, method is "POST" or "PUT" or "PATCH" ? "{}" : ""), false, false));
                if (route != "/health") cases.Add(($"{method} {route} no key", RawRequest(method, route, null), false, true));
            }
        // Bodies that never complete wait out Kestrel's minimum data rate (~5 s): those run alongside the rest.
        var incomplete = new HashSet<string> { "chunked size too big", "chunked no terminator", "CL longer than body" };
        async Task Run(string name, byte[] req, bool kestrel, bool wrongKey)
        {
            var (code, _, text) = await Raw(req, 10_000);
            if (name.StartsWith("HEAD ", StringComparison.Ordinal)) text = code >= 400 ? "{\"error\":{\"message\":\"head\"}}" : text; // HEAD answers carry no body
            if (name == "asterisk target" && code < 400) code = 400; // OPTIONS * with no route: whatever it says, it is not served
            lock (_failures) Judge(name, code, text, kestrelLevel: kestrel, wrongKey: wrongKey, expect: incomplete.Contains(name) ? [400, 408] : null);
        }
        var slow = cases.Where(k => incomplete.Contains(k.name)).Select(k => Run(k.name, k.req, k.kestrel, k.wrongKey)).ToList();
        foreach (var (name, req, kestrel, wrongKey) in cases.Where(k => !incomplete.Contains(k.name))) await Run(name, req, kestrel, wrongKey);
        await Task.WhenAll(slow);
        AssertAllClean();
    }

    [Fact]
    public async Task PathologicalButWellTypedFields()
    {
        string Body(string extra, string prompt = "\"Hi\"") => $"{{\"model\":\"base\",\"prompt\":{prompt},\"temperature\":0{extra}}}";
        string Chat(int n, string content = "a") => $"{{\"model\":\"base\",\"max_tokens\":2,\"messages\":[{string.Join(",", Enumerable.Range(0, n).Select(i => $"{{\"role\":\"{(i % 2 == 0 ? "user" : "assistant")}\",\"content\":\"{content}\"}}"))}]}}";
        var big = new string('x', 12_000);
        var cases = new List<(string name, string path, string body, int[] expect)>
        {
            ("max_tokens 2^31-1", "/v1/completions", Body(",\"max_tokens\":2147483647"), [400]),
            ("max_tokens 2^63-1", "/v1/completions", Body(",\"max_tokens\":9223372036854775807"), [400]),
            ("max_tokens 1e9 chat", "/v1/chat/completions", Chat(1).Replace("\"max_tokens\":2", "\"max_tokens\":1000000000"), [400]),
            ("max_completion_tokens huge", "/v1/chat/completions", Chat(1).Replace("\"max_tokens\":2", "\"max_completion_tokens\":99999999"), [400]),
            ("4 stop strings of 12k", "/v1/completions", Body($",\"max_tokens\":8,\"stop\":[\"{big}\",\"{big}1\",\"{big}2\",\"{big}3\"]"), [200, 400]),
            ("many stop strings", "/v1/completions", Body($",\"max_tokens\":8,\"stop\":[{string.Join(",", Enumerable.Range(0, 2000).Select(i => $"\"s{i}\""))}]"), [400]),
            ("empty stop strings", "/v1/completions", Body(",\"max_tokens\":8,\"stop\":[\"\",\"\"]"), [200, 400]),
            ("prompt 12k chars", "/v1/completions", Body(",\"max_tokens\":2", $"\"{big}\""), [400]),
            ("prompt 60k chars", "/v1/completions", Body(",\"max_tokens\":2", $"\"{new string('y', 60_000)}\""), [400]),
            ("prompt of 3k emoji", "/v1/completions", Body(",\"max_tokens\":2", $"\"{string.Concat(Enumerable.Repeat("\\ud83d\\ude00", 3000))}\""), [400]),
            ("prompt of escapes", "/v1/completions", Body(",\"max_tokens\":2", $"\"{string.Concat(Enumerable.Repeat("\\u0000\\n\\t", 1500))}\""), [200, 400]),
            ("2000 messages", "/v1/chat/completions", Chat(2000), [400]),
            ("5 messages", "/v1/chat/completions", Chat(5), [200]),
            ("message of 12k", "/v1/chat/completions", Chat(1, big), [400]),
            ("message with template syntax", "/v1/chat/completions", Chat(2, "{{ raise_exception('x') }}{% for x in range(99999999) %}"), [200]),
            ("200 empty messages", "/v1/chat/completions", Chat(200, ""), [200, 400]),
            ("seed max", "/v1/completions", Body(",\"max_tokens\":2,\"seed\":18446744073709551615"), [200, 400]),
            ("corrupt adapter as model", "/v1/completions", Body(",\"max_tokens\":2").Replace("\"base\"", "\"corrupt\""), [422]),
            ("corrupt adapter chat", "/v1/chat/completions", Chat(1).Replace("\"base\"", "\"corrupt\""), [422]),
            ("corrupt adapter classify", "/v1/classify", "{\"model\":\"corrupt\",\"input\":\"hi\"}", [400, 422]),
            ("plain file as model", "/v1/completions", Body(",\"max_tokens\":2").Replace("\"base\"", "\"plainfile\""), [404]),
            ("causal adapter on classify", "/v1/classify", "{\"model\":\"a\",\"input\":[\"hi\",\"ho\"]}", [400]),
            ("classify 5000 inputs", "/v1/classify", $"{{\"model\":\"a\",\"input\":[{string.Join(",", Enumerable.Range(0, 5000).Select(_ => "\"x\""))}]}}", [400]),
        };
        foreach (var (name, path, body, expect) in cases)
        {
            var sw = System.Diagnostics.Stopwatch.StartNew();
            var (code, _, text) = await Raw(RawPost(path, body), 20_000);
            Judge(name, code, text, expect: expect);
            if (sw.Elapsed > TimeSpan.FromSeconds(5)) { _failures.Add($"{name}: took {sw.Elapsed.TotalSeconds:F1} s"); }
        }
        AssertAllClean();
    }

    [Fact]
    public async Task ClientTextCannotForgeRequestLogLines()
    {
        var marker = "FORGED" + Guid.NewGuid().ToString("N")[..8];
        foreach (var model in new[] { $"x\n{marker} POST /admin/adapters status=200", $"x\r{marker}", $"x\u2028{marker}", $"x\u0085{marker}", $"x status=200 {marker}", new string('m', 3000) + marker })
        {
            var json = new JsonObject { ["model"] = model, ["prompt"] = "Hi", ["max_tokens"] = 2 }.ToJsonString();
            var (code, _, body) = await Raw(RawPost("/v1/completions", json));
            Judge($"log forging {Trunc(model)}", code, body, expect: [400, 404]);
        }
        await Task.Delay(100);
        foreach (var line in fx.ServerLog.Where(l => l.Contains(marker, StringComparison.Ordinal) || l.Contains("mmmmmmmmmm", StringComparison.Ordinal)))
        {
            _cases++;
            if (line.Any(ch => char.IsControl(ch) || ch is '\u2028' or '\u2029') || line.Contains($" {marker}", StringComparison.Ordinal) || line.Length > 400)
                _failures.Add($"a log line carries the client's text as it came: {Trunc(line)}");
        }
        AssertAllClean();
    }

    [Fact]
    public async Task AdapterNamesThatTryToLeaveTheAdaptersDirectory()
    {
        var outside = Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen3", "a"));
        var linkedFiles = Directory.CreateDirectory(Path.Combine(fx.Adapters, "linkedfiles")).FullName;
        foreach (var f in Directory.GetFiles(outside)) File.CreateSymbolicLink(Path.Combine(linkedFiles, Path.GetFileName(f)), f);
        var names = new List<string>
        {
            "..", ".", "...", "../a", "..%2Fa", "..%2F..%2Fetc", "%2e%2e", "%2e%2e%2f%2e%2e", "a%2F..%2F..", "..%5C..%5Ca", "a\\..\\b", "%5c",
            "%c0%ae%c0%ae", "\u2024\u2024", "\uff0e\uff0e\uff0f", "a\u2215b", "escape", "linkedfiles", "plainfile", "corrupt", "ＡＢ",
            new string('a', 129), new string('a', 5000), "a%00", "a%0d%0aX-Injected:%201", "-a", ".hidden", "a.", "con", "~", "%25%32%65",
            "a/b", "a//b", "a;b", "a?b", "a#b", " a", "a ", "%20", "%", "%zz", "a%", "\u202ea", "a\u0301",
        };
        foreach (var name in names)
        {
            var path = name.Contains('%') ? name : Uri.EscapeDataString(name);
            var trimmedPath = path.Length > 2000 ? path[..2000] : path;
            foreach (var (m, p) in new[] { ("POST", $"/admin/adapters/{trimmedPath}/load"), ("POST", $"/admin/adapters/{trimmedPath}/reload"), ("DELETE", $"/admin/adapters/{trimmedPath}") })
            {
                var (code, _, body) = await Raw(RawRequest(m, p, HostileServer.AdminKey));
                Judge($"{m} {p}", code, body, kestrelLevel: name.Contains("%00"), expect: name is "a" ? null : [400, 404, 405, 422]);
            }
            var json = new JsonObject { ["model"] = name, ["prompt"] = "Hi", ["max_tokens"] = 2 }.ToJsonString();
            var (c2, _, b2) = await Raw(RawPost("/v1/completions", json));
            Judge($"model={Trunc(name)}", c2, b2, expect: [400, 404, 422]);
        }
        AssertAllClean();
    }
}

[CollectionDefinition("tensor-count", DisableParallelization = true)]
public sealed class TensorCountCollection;

/// <summary>
/// Live TorchSharp tensors stay flat across requests of every kind, dropped streams included (a dispose scope per
/// request and per step). Alone in its collection: other tests' tensors would blur the count.
/// </summary>
[Collection("tensor-count")]
public class ServerTensorCountTests
{
    [Fact]
    public async Task LiveTensorsStayFlatAcrossRequestsStreamsAndDroppedStreams()
    {
        var fx = new HostileServer();
        await fx.InitializeAsync();
        try
        {
            var t = new FuzzHttpHostileTests(fx);
            async Task Round(int i)
            {
                await t.AbortMidStreamPublic(i % 2 == 0 ? "a" : "base");
                await t.CompletePublic(i % 3 == 0 ? "regex" : "a", stream: i % 2 == 1);
                await t.CompletePublic("base", stream: false);
            }
            for (int i = 0; i < 4; i++) await Round(i); // warm-up: adapters loaded, caches of the first calls made
            await Task.Delay(300);
            long before = TorchSharp.torch.Tensor.TotalCount;
            int rounds = 12 * FuzzContract.Scale;
            for (int i = 0; i < rounds; i++) await Round(i);
            await Task.Delay(300); // dropped streams leave the batch at the engine's next step
            long after = TorchSharp.torch.Tensor.TotalCount;
            Assert.True(after - before <= 4, $"live tensors grew from {before} to {after} over {rounds * 3} requests");
        }
        finally { await fx.DisposeAsync(); }
    }
}

/// <summary>Classification and causal adapters on each other's routes, concurrently, while the admin reloads them.</summary>
public class FuzzHttpTaskMixTests
{
    [Fact]
    public async Task ClassificationAndCausalAdaptersOnEachOthersRoutesUnderLoadAndReloads()
    {
        var root = Fixtures.TempDir();
        Fixtures.CopyOf(TinyClassifiers.Get("qwen2").adapter, Path.Combine(root, "clf"));
        Fixtures.CopyOf(Fixtures.Path_("adapters", "qwen2", "a"), Path.Combine(root, "causal"));
        var log = new System.Collections.Concurrent.ConcurrentQueue<string>();
        await using var server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen2"), Adapters = root, Port = 0, ApiKey = "u", AdminKey = "ad", Device = "cpu",
            MaxTokens = 16, MaxConcurrent = 4, MaxQueued = 8, MaxLoadedAdapters = 1, Log = log.Enqueue, // one slot: every switch evicts
        });
        using var http = new HttpClient { BaseAddress = new Uri(server.Url), Timeout = TimeSpan.FromSeconds(30) };
        var failures = new System.Collections.Concurrent.ConcurrentBag<string>();
        async Task Call(string name, HttpMethod method, string path, string? body, string key, int[] expect)
        {
            using var req = new HttpRequestMessage(method, path);
            if (body != null) req.Content = new StringContent(body, Encoding.UTF8, "application/json");
            req.Headers.Authorization = new System.Net.Http.Headers.AuthenticationHeaderValue("Bearer", key);
            using var res = await http.SendAsync(req);
            var text = await res.Content.ReadAsStringAsync();
            int code = (int)res.StatusCode;
            string? verdict = code >= 500 ? $"status {code}: {log.LastOrDefault(l => l.StartsWith("error:", StringComparison.Ordinal))}"
                : !expect.Contains(code) ? $"status {code}: {text}"
                : code >= 400 && !text.Contains("\"message\"", StringComparison.Ordinal) ? $"status {code} without an error object: {text}" : null;
            FuzzContract.Record("http-hostile", name, verdict is null ? (code < 400 ? "ok" : "clean-error") : "unclean", verdict ?? $"{code}");
            if (verdict != null) failures.Add($"{name}: {verdict}");
        }
        int n = 6 * FuzzContract.Scale;
        var work = new List<Task>();
        for (int i = 0; i < n; i++)
        {
            work.Add(Call($"clf on completions {i}", HttpMethod.Post, "/v1/completions", "{\"model\":\"clf\",\"prompt\":\"hi\",\"max_tokens\":4}", "u", [400, 429]));
            work.Add(Call($"causal on classify {i}", HttpMethod.Post, "/v1/classify", "{\"model\":\"causal\",\"input\":\"hi\"}", "u", [400, 429]));
            work.Add(Call($"clf on classify {i}", HttpMethod.Post, "/v1/classify", "{\"model\":\"clf\",\"input\":[\"reset my password\",\"refund my payment\"]}", "u", [200, 429]));
            work.Add(Call($"causal on completions {i}", HttpMethod.Post, "/v1/completions", "{\"model\":\"causal\",\"prompt\":\"hi\",\"max_tokens\":8,\"stream\":" + (i % 2 == 0 ? "true" : "false") + "}", "u", [200, 429]));
            work.Add(Call($"clf on chat {i}", HttpMethod.Post, "/v1/chat/completions", "{\"model\":\"clf\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", "u", [400, 429]));
            work.Add(Call($"reload clf {i}", HttpMethod.Post, "/admin/adapters/clf/reload", null, "ad", [200, 409]));
            work.Add(Call($"unload causal {i}", HttpMethod.Delete, "/admin/adapters/causal", null, "ad", [200, 404, 409]));
        }
        await Task.WhenAll(work);
        Assert.True(failures.IsEmpty, $"{failures.Count} of {work.Count} broke the contract:\n" + string.Join("\n", failures.Take(30)));
    }
}

/// <summary>Keys no client can send (empty, padded, with spaces, control or non-ASCII characters) are refused at start.</summary>
public class ServerKeyShapeTests
{
    public static TheoryData<string> Unusable => new() { "", " ", " zq9secret", "zq9secret ", "zq9 secret", "zq9secret\n", "zq9se\tcret", "zq9sécret", "zq9secret\u0000", "\u00a0zq9secret" };

    [Theory, MemberData(nameof(Unusable))]
    public async Task KeysThatNoClientCouldSendAreRefusedAtStart(string key)
    {
        foreach (var (api, admin) in new[] { (key, (string?)null), ((string?)null, key), ("fine-key", key) })
        {
            var e = await Assert.ThrowsAnyAsync<LoraKitException>(() => OpenAiServer.StartAsync(new ServerOptions
            {
                Model = Fixtures.Model("qwen3"), Adapters = Fixtures.TempDir(), Port = 0, ApiKey = api, AdminKey = admin, Device = "cpu",
            }));
            Assert.Contains(api == key ? "API key" : "admin key", e.Message);
            Assert.DoesNotContain("zq9", e.Message); // never echo the secret
        }
    }
}
