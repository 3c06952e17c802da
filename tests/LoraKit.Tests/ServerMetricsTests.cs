using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Server;

namespace LoraKit.Tests;

/// <summary>GET /metrics on the real server (loopback, tiny Qwen3): format, counts, keys; /health and 503s while draining.</summary>
public class ServerMetricsTests
{
    const string UserKey = "user-key-123";
    const string AdminKey = "admin-key-456";
    const int MaxTokens = 200; // the fixture's context is 256: a long stream that a cancel surely interrupts

    static async Task<(OpenAiServer server, string adapters)> Start(string? apiKey = UserKey, string? adminKey = AdminKey, bool metricsPublic = false, TimeSpan? drain = null,
        int maxConcurrent = 32, int maxQueued = 64)
    {
        var adapters = Fixtures.TempDir();
        var server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("qwen3"), Adapters = adapters, Port = 0, ApiKey = apiKey, AdminKey = adminKey, Device = "cpu",
            MaxTokens = MaxTokens, ModelName = "tiny", MetricsPublic = metricsPublic, DrainTimeout = drain ?? TimeSpan.FromSeconds(30),
            MaxConcurrent = maxConcurrent, MaxQueued = maxQueued,
        });
        return (server, adapters);
    }

    static HttpClient Client(OpenAiServer server, string? key = UserKey)
    {
        var http = new HttpClient { BaseAddress = new Uri(server.Url), Timeout = TimeSpan.FromSeconds(60) };
        if (key is not null) http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return http;
    }

    static StringContent Json(object body) => new(JsonSerializer.Serialize(body), Encoding.UTF8, "application/json");

    static async Task<PrometheusParser> Scrape(HttpClient http)
    {
        using var res = await http.GetAsync("/metrics");
        var text = await res.Content.ReadAsStringAsync();
        Assert.True(res.StatusCode == HttpStatusCode.OK, text);
        Assert.Equal("text/plain", res.Content.Headers.ContentType!.MediaType);
        Assert.Contains(res.Content.Headers.ContentType.Parameters, p => p.Name == "version" && p.Value == "0.0.4");
        return PrometheusParser.Parse(text);
    }

    /// <summary>The SSE stream's text chunks and its usage chunk's completion_tokens.</summary>
    static (string text, int completion, int prompt) ReadStream(string sse)
    {
        var chunks = sse.Split("\n\n", StringSplitOptions.RemoveEmptyEntries).Where(l => l != "data: [DONE]").Select(l => JsonNode.Parse(l["data: ".Length..])!).ToList();
        var usage = chunks.Last(ch => ch["usage"] is not null)["usage"]!;
        return ("", usage["completion_tokens"]!.GetValue<int>(), usage["prompt_tokens"]!.GetValue<int>());
    }

    int polls;

    /// <summary>Scrapes until <paramref name="ok"/> holds (30 s at most) and returns that scrape; <see cref="polls"/> counts the scrapes.</summary>
    async Task<PrometheusParser> Until(HttpClient http, Func<PrometheusParser, bool> ok, string failure)
    {
        polls = 0;
        var wait = Stopwatch.StartNew();
        while (true)
        {
            polls++;
            var m = await Scrape(http);
            if (ok(m)) return m;
            Assert.True(wait.Elapsed < TimeSpan.FromSeconds(30), failure);
            await Task.Delay(20);
        }
    }

    [Fact]
    public async Task MetricsCountWhatWasSentAndParseStrictly()
    {
        var (server, adapters) = await Start();
        try
        {
            using var http = Client(server);
            var before = await Scrape(http);
            int scrapes = 1;
            Assert.Equal(0, before.Value("lorakit_requests_queued_total"));

            // Three plain completions, a chat completion, two streams (completion and chat): all run to max_tokens.
            var plain = new[] { 5, 9, 13 }.Select(async n =>
            {
                using var res = await http.PostAsync("/v1/completions", Json(new { model = "base", prompt = "Hello there", max_tokens = n, ignore_eos = true, temperature = 0 }));
                var body = JsonNode.Parse(await res.Content.ReadAsStringAsync())!;
                Assert.Equal(HttpStatusCode.OK, res.StatusCode);
                return (body["usage"]!["completion_tokens"]!.GetValue<int>(), body["usage"]!["prompt_tokens"]!.GetValue<int>());
            });
            async Task<(int, int)> Chat(bool stream)
            {
                using var res = await http.PostAsync("/v1/chat/completions", Json(new
                {
                    model = "tiny", messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 7, ignore_eos = true, temperature = 0.8, seed = 3,
                    stream, stream_options = stream ? new { include_usage = true } : null,
                }));
                var text = await res.Content.ReadAsStringAsync();
                Assert.True(res.StatusCode == HttpStatusCode.OK, text);
                if (stream) { var (_, c, p) = ReadStream(text); return (c, p); }
                var body = JsonNode.Parse(text)!;
                return (body["usage"]!["completion_tokens"]!.GetValue<int>(), body["usage"]!["prompt_tokens"]!.GetValue<int>());
            }
            async Task<(int, int)> CompletionStream()
            {
                using var res = await http.PostAsync("/v1/completions", Json(new { model = "base", prompt = "Once upon", max_tokens = 11, ignore_eos = true, stream = true, stream_options = new { include_usage = true } }));
                var (_, c, p) = ReadStream(await res.Content.ReadAsStringAsync());
                return (c, p);
            }
            var done = await Task.WhenAll([.. plain, Chat(false), Chat(true), CompletionStream()]);
            Assert.Equal(new[] { 5, 9, 13, 7, 7, 11 }, done.Select(d => d.Item1));

            // One stream whose client gives up while it waits in the engine's queue: the engine thread is held by an action
            // of the test's, so the order is certain (queued, client gone and seen by the server, then the engine reads it).
            using (var gate = new ManualResetEventSlim())
            {
                var held = server.Engine.RunAsync(_ => { gate.Wait(); return 0; });
                using var cts = new CancellationTokenSource();
                using var req = new HttpRequestMessage(HttpMethod.Post, "/v1/completions")
                { Content = Json(new { model = "base", prompt = "The story goes", max_tokens = MaxTokens, ignore_eos = true, stream = true }) };
                var send = http.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, cts.Token);
                try
                {
                    await Until(http, m => m.Value("lorakit_requests_queued_total") == done.Length + 1, "the stream never reached the engine's queue");
                    scrapes += polls;
                    cts.Cancel();
                    await Assert.ThrowsAnyAsync<OperationCanceledException>(() => send);
                    await Until(http, m => m.ValueOrZero("lorakit_http_requests_total", "path=/v1/completions", "status=499") == 1, "the server never saw the client go");
                    scrapes += polls;
                }
                finally { gate.Set(); }
                await held;
            }
            await Until(http, m => m.Value("lorakit_requests_total", "reason=cancelled") == 1, "the engine did not end the stream as cancelled");
            scrapes += polls;
            // A wrong key: counted by route and status, not by the engine.
            using (var wrong = Client(server, "nope")) Assert.Equal(HttpStatusCode.Unauthorized, (await wrong.GetAsync("/v1/models")).StatusCode);

            // A request is counted just after its response is sent: once only this scrape is in flight, all are in.
            var m = await Until(http, m => m.Value("lorakit_http_requests_in_flight") == 1, "requests stayed in flight");
            scrapes += polls - 1;
            int completed = done.Length, completedTokens = done.Sum(d => d.Item1);
            Assert.Equal(completed + 1, m.Value("lorakit_requests_queued_total"));
            Assert.Equal(completed, m.Value("lorakit_requests_admitted_total")); // the cancelled one never was
            Assert.Equal(completed, m.Value("lorakit_requests_total", "reason=length"));
            Assert.Equal(1, m.Value("lorakit_requests_total", "reason=cancelled"));
            Assert.Equal(0, m.Value("lorakit_requests_total", "reason=stop") + m.Value("lorakit_requests_total", "reason=error"));
            Assert.Equal(done.Sum(d => d.Item2), m.Value("lorakit_prompt_tokens_total"));
            Assert.Equal(completedTokens, m.Value("lorakit_generation_tokens_total"));
            // Every completed request has one time to first token; each of its later tokens one time per output token.
            Assert.Equal(completed, m.Value("lorakit_time_to_first_token_seconds_count"));
            Assert.Equal(completedTokens - completed, m.Value("lorakit_time_per_output_token_seconds_count"));
            Assert.Equal(m.Value("lorakit_steps_total"), m.Value("lorakit_batch_size_count"));
            // Steps: one prefill per request (1 row, its prompt's tokens), then decode steps whose rows are the later tokens.
            Assert.Equal(completedTokens, m.Value("lorakit_batch_size_sum"));
            Assert.Equal(done.Sum(d => d.Item2) + completedTokens - completed, m.Value("lorakit_step_tokens_sum"));
            Assert.Equal((0, 0), (m.Value("lorakit_queue_length"), m.Value("lorakit_running_requests")));
            // The server's HTTP counts: by route pattern and status; this scrape is in flight.
            Assert.Equal(4, m.Value("lorakit_http_requests_total", "path=/v1/completions", "status=200")); // 3 plain, a stream
            Assert.Equal(1, m.Value("lorakit_http_requests_total", "path=/v1/completions", "status=499")); // the client left before any byte
            Assert.Equal(2, m.Value("lorakit_http_requests_total", "path=/v1/chat/completions", "status=200"));
            Assert.Equal(1, m.Value("lorakit_http_requests_total", "path=/v1/models", "status=401"));
            Assert.Equal(scrapes, m.Value("lorakit_http_requests_total", "path=/metrics", "status=200"));
            Assert.Equal(1, m.Value("lorakit_http_requests_in_flight"));
            Assert.Equal(0, m.Value("lorakit_draining"));
            Assert.Equal(0, m.Value("lorakit_http_requests_rejected_total", "reason=rate_limited"));
        }
        finally
        {
            await server.DisposeAsync();
            Directory.Delete(adapters, true);
        }
    }

    [Fact]
    public async Task A429IsCountedAsRateLimited()
    {
        var (server, adapters) = await Start(null, null, maxConcurrent: 1, maxQueued: 0);
        try
        {
            using var http = Client(server, null);
            using var gate = new ManualResetEventSlim();
            var held = server.Engine.RunAsync(_ => { gate.Wait(); return 0; }); // the one place stays taken until released
            var first = http.PostAsync("/v1/completions", Json(new { model = "base", prompt = "Hi", max_tokens = 2 }));
            try
            {
                await Until(http, m => m.Value("lorakit_requests_queued_total") == 1, "the first request never reached the engine");
                using (var second = await http.PostAsync("/v1/completions", Json(new { model = "base", prompt = "Hi", max_tokens = 2 })))
                    Assert.Equal(HttpStatusCode.TooManyRequests, second.StatusCode);
                var m = await Until(http, m => m.Value("lorakit_http_requests_in_flight") == 2, "the refused request stayed in flight"); // the first and the scrape
                Assert.Equal(1, m.Value("lorakit_http_requests_rejected_total", "reason=rate_limited"));
                Assert.Equal(1, m.Value("lorakit_http_requests_total", "path=/v1/completions", "status=429"));
            }
            finally { gate.Set(); }
            await held;
            using var ok = await first;
            Assert.Equal(HttpStatusCode.OK, ok.StatusCode);
        }
        finally
        {
            await server.DisposeAsync();
            Directory.Delete(adapters, true);
        }
    }

    [Theory]
    [InlineData(UserKey, AdminKey, false)]
    [InlineData(UserKey, null, false)]
    [InlineData(null, AdminKey, false)]
    [InlineData(UserKey, AdminKey, true)]
    [InlineData(null, null, false)]
    public async Task MetricsTakeAKeyLikeV1UnlessPublic(string? apiKey, string? adminKey, bool metricsPublic)
    {
        var (server, adapters) = await Start(apiKey, adminKey, metricsPublic);
        try
        {
            bool open = metricsPublic || (apiKey is null && adminKey is null);
            foreach (var (key, valid) in new[] { (null, false), ("nope", false), (UserKey, apiKey is not null), (AdminKey, adminKey is not null) })
            {
                using var http = Client(server, key);
                using var res = await http.GetAsync("/metrics");
                var text = await res.Content.ReadAsStringAsync();
                string what = $"/metrics with key {key ?? "(none)"}: {(int)res.StatusCode} {text}";
                if (open || valid)
                {
                    Assert.True(res.StatusCode == HttpStatusCode.OK, what);
                    PrometheusParser.Parse(text);
                }
                else
                {
                    Assert.True(res.StatusCode == HttpStatusCode.Unauthorized, what);
                    Assert.NotNull(JsonNode.Parse(text)!["error"]!["message"]);
                    Assert.DoesNotContain("lorakit_", text);
                }
            }
            // MetricsPublic opens /metrics only: /v1 still takes its key.
            using var anon = Client(server, null);
            Assert.Equal(apiKey is null && adminKey is null ? HttpStatusCode.OK : HttpStatusCode.Unauthorized, (await anon.GetAsync("/v1/models")).StatusCode);
        }
        finally
        {
            await server.DisposeAsync();
            Directory.Delete(adapters, true);
        }
    }

    [Fact]
    public async Task DrainingAnswers503OnHealthAndNewWorkWhileInFlightRequestsFinish()
    {
        var (server, adapters) = await Start(null, null);
        try
        {
            var uri = new Uri(server.Url);
            // In flight for certain: headers and half the body are in when the drain starts; the rest follows after.
            var body = Encoding.UTF8.GetBytes("{\"model\":\"base\",\"prompt\":\"Hello\",\"max_tokens\":8,\"ignore_eos\":true,\"temperature\":0}");
            using var tcp = new System.Net.Sockets.TcpClient();
            await tcp.ConnectAsync(uri.Host, uri.Port);
            var stream = tcp.GetStream();
            await stream.WriteAsync(Encoding.ASCII.GetBytes($"POST /v1/completions HTTP/1.1\r\nHost: {uri.Authority}\r\nContent-Type: application/json\r\nContent-Length: {body.Length}\r\n\r\n"));
            await stream.WriteAsync(body.AsMemory(0, 20));
            using var http = Client(server, null);
            await Until(http, m => m.Value("lorakit_http_requests_in_flight") == 2, "the half-sent request never reached the server"); // it and the scrape

            var stopping = server.DisposeAsync().AsTask();
            using (var health = await http.GetAsync("/health"))
            {
                Assert.Equal(HttpStatusCode.ServiceUnavailable, health.StatusCode);
                Assert.Equal("draining", JsonNode.Parse(await health.Content.ReadAsStringAsync())!["status"]!.GetValue<string>());
            }
            using (var fresh = Client(server, null))
            using (var refused = await fresh.PostAsync("/v1/completions", Json(new { model = "base", prompt = "Hi", max_tokens = 2 })))
            {
                Assert.Equal(HttpStatusCode.ServiceUnavailable, refused.StatusCode);
                var error = JsonNode.Parse(await refused.Content.ReadAsStringAsync())!["error"]!;
                Assert.Equal("server_error", error["type"]!.GetValue<string>());
                Assert.Contains("shutting down", error["message"]!.GetValue<string>());
                Assert.True(refused.Headers.ConnectionClose);
            }
            // Scrapers still read the numbers while draining (the refused request is counted just after its answer).
            var m = await Until(http, m => m.Value("lorakit_http_requests_in_flight") == 2, "the refused request stayed in flight");
            Assert.Equal(1, m.Value("lorakit_draining"));
            Assert.Equal(1, m.Value("lorakit_http_requests_rejected_total", "reason=draining"));
            Assert.Equal(1, m.Value("lorakit_http_requests_total", "path=/v1/completions", "status=503"));
            Assert.False(stopping.IsCompleted, "the server stopped with a request in flight");

            await stream.WriteAsync(body.AsMemory(20));
            stream.ReadTimeout = 60_000;
            var response = await new StreamReader(stream).ReadToEndAsync(); // the server closes the connection as it stops
            Assert.StartsWith("HTTP/1.1 200", response);
            Assert.Contains("\"finish_reason\":\"length\"", response);
            Assert.True(await Task.WhenAny(stopping, Task.Delay(30_000)) == stopping, "the server did not stop once the in-flight request was done");
            await stopping;
            await server.DisposeAsync(); // again: the same stop, already done
        }
        finally { Directory.Delete(adapters, true); }
    }

    [Fact]
    public async Task ServeMetricsPublicFlagOpensMetricsOnly()
    {
        var adapters = Fixtures.TempDir();
        var (started, url, stderr) = await ServeProcess.StartAsync("--model", Fixtures.Model("qwen3"),
                     "--adapters", adapters, "--port", "0", "--device", "cpu", "--api-key", UserKey, "--metrics-public", "--quiet");
        using var p = started;
        try
        {
            if (url is null) Assert.Fail("serve did not start: " + await stderr);
            using var anon = new HttpClient { BaseAddress = new Uri(url!) };
            using (var res = await anon.GetAsync("/metrics"))
            {
                Assert.Equal(HttpStatusCode.OK, res.StatusCode);
                Assert.Equal(0, PrometheusParser.Parse(await res.Content.ReadAsStringAsync()).Value("lorakit_requests_queued_total"));
            }
            Assert.Equal(HttpStatusCode.Unauthorized, (await anon.GetAsync("/v1/models")).StatusCode);
            using (var kill = Process.Start("kill", ["-TERM", p.Id.ToString()])) kill.WaitForExit();
            Assert.True(p.WaitForExit(30_000), "serve did not exit after SIGTERM");
            Assert.True(p.ExitCode == 0, await stderr);
        }
        finally
        {
            if (!p.HasExited) p.Kill(true);
            Directory.Delete(adapters, true);
        }
    }
}
