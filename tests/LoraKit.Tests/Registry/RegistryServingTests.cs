using System.Diagnostics;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Registry;
using LoraKit.Server;
using Microsoft.Data.Sqlite;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LoraKit.Tests.Registry;

/// <summary>
/// Serving from the registry on a real loopback server over a real SQLite registry with the fixture adapters llama/a (v1)
/// and llama/b (v2): "tone" = tone@production; an alias moved by `lorakit registry promote/rollback` in another process
/// switches responses within 2 s without restart; a request in flight during the switch ends on the version it started
/// with; /v1/models lists aliases and versions; unknown, malformed, damaged and other-base references are clear 4xx/503.
/// </summary>
public class RegistryServingTests(ITestOutputHelper output)
{
    const string Prompt = "Tell me a short story";
    static readonly TimeSpan SwitchLimit = TimeSpan.FromSeconds(2);

    [Fact]
    public async Task AliasMovedByAnotherProcessSwitchesWithoutRestartAndInFlightRequestsKeepTheirVersion()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        using (var store = AdapterStore.Open(reg))
        {
            store.Add("tone", Fixtures.Path_("adapters", "llama", "a"));
            store.Add("tone", Fixtures.Path_("adapters", "llama", "b"));
            store.Promote("tone@1", "production", noGate: true);
        }
        await using var server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("llama"), Registry = reg, Port = 0, Device = "cpu", MaxTokens = 64, ModelName = "tiny",
        });
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };

        var v1 = await Chat(http, "tone@1");
        var v2 = await Chat(http, "tone@2");
        Assert.Equal(200, v1.Code);
        Assert.NotEqual(v1.Text, v2.Text); // the two versions are told apart by their output alone
        Assert.StartsWith("tone@1 sha256:" + AdapterDigest.Compute(Fixtures.Path_("adapters", "llama", "a")), v1.Version);
        Assert.Equal((v1.Text, v1.Version), ((await Chat(http, "tone@production")).Text, (await Chat(http, "tone@production")).Version));
        Assert.Equal(v1.Text, (await Chat(http, "tone")).Text);

        var models = await Models(http);
        Assert.Equal("tone@1", models["tone@production"]!["root"]!.GetValue<string>());
        Assert.Equal("tiny", models["tone@production"]!["parent"]!.GetValue<string>());
        Assert.Equal("production", models["tone@production"]!["lorakit"]!["alias"]!.GetValue<string>());
        Assert.Equal(2, models["tone@2"]!["lorakit"]!["version"]!.GetValue<int>());
        Assert.Equal(AdapterDigest.Compute(Fixtures.Path_("adapters", "llama", "b")), models["tone@2"]!["lorakit"]!["sha256"]!.GetValue<string>());

        // A streaming request that resolved tone → v1 and is held before its first token (the engine is paused between
        // steps) while another process moves the alias: it must still finish on v1.
        using var gate = new ManualResetEventSlim();
        var paused = server.Engine.RunAsync(_ => gate.Wait(TimeSpan.FromSeconds(30)));
        Task<string> inFlight;
        HttpResponseMessage streaming;
        try
        {
            streaming = await http.SendAsync(ChatRequest("tone", stream: true), HttpCompletionOption.ResponseHeadersRead);
            var reader = new StreamReader(await streaming.Content.ReadAsStreamAsync());
            Assert.StartsWith("data: ", await reader.ReadLineAsync()); // the role chunk: the request has resolved its version
            Assert.StartsWith("tone@1 ", VersionOf(streaming));
            inFlight = ReadStream(reader);

            var (code, _, stderr) = CliTests.RunCli("registry", "promote", "tone@2", "--alias", "production", "--no-gate", "--registry", reg);
            Assert.True(code == 0, stderr);
        }
        finally { gate.Set(); }
        var switched = await PollUntil(http, v2.Text);
        output.WriteLine($"promote → first request answered by v2 sent after {switched.Sent.TotalMilliseconds:0} ms, answered after {switched.Answered.TotalMilliseconds:0} ms");
        Assert.True(switched.Sent < SwitchLimit, $"the switch took {switched.Sent.TotalMilliseconds:0} ms");
        Assert.Equal(v1.Text, await inFlight); // resolved before the switch, generated after it: still v1
        Assert.True(await paused);
        streaming.Dispose();
        Assert.Equal("tone@2", (await Models(http))["tone@production"]!["root"]!.GetValue<string>());

        var (rc, _, err) = CliTests.RunCli("registry", "rollback", "tone", "--alias", "production", "--registry", reg);
        Assert.True(rc == 0, err);
        var rolledBack = await PollUntil(http, v1.Text);
        output.WriteLine($"rollback → first request answered by v1 sent after {rolledBack.Sent.TotalMilliseconds:0} ms, answered after {rolledBack.Answered.TotalMilliseconds:0} ms");
        Assert.True(rolledBack.Sent < SwitchLimit, $"the rollback took {rolledBack.Sent.TotalMilliseconds:0} ms");
        Assert.Equal("tone@1", (await Models(http))["tone@production"]!["root"]!.GetValue<string>());
    }

    [Fact]
    public async Task UnknownMalformedDamagedAndOtherBaseReferencesAreClearErrors()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        var alien = OnAnotherBase(Path.Combine(dir, "alien"));
        string damagedBlob;
        using (var store = AdapterStore.Open(reg))
        {
            store.Add("tone", Fixtures.Path_("adapters", "llama", "a"));
            store.Promote("tone@1", "production", noGate: true);
            store.Add("tone", Fixtures.Path_("adapters", "llama", "b"));
            var c = store.Add("tone", Fixtures.Path_("adapters", "llama", "c"));
            damagedBlob = c.Files.Single(f => f.File == AdapterFiles.WeightsFile).Blob;
            store.Add("unpromoted", Fixtures.Path_("adapters", "llama", "a"));
            store.Add("alien", alien);
            store.Promote("alien@1", "production", noGate: true);
        }
        // One flipped byte in tone@3's weights blob, which no request has checked out yet.
        var blobPath = Directory.GetFiles(Path.Combine(reg, "blobs"), damagedBlob, SearchOption.AllDirectories).Single();
        var bytes = File.ReadAllBytes(blobPath);
        bytes[^1] ^= 0x55;
        File.WriteAllBytes(blobPath, bytes);

        var adapters = Fixtures.TempDir();
        Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", "b"), Path.Combine(adapters, "plain"));
        await using var server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("llama"), Adapters = adapters, Registry = reg, Port = 0, Device = "cpu", MaxTokens = 64, ModelName = "tiny",
        });
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };

        // Directory adapters and the base keep working beside the registry.
        Assert.Equal(200, (await Chat(http, "plain")).Code);
        Assert.Equal(200, (await Chat(http, "tiny")).Code);
        var models = await Models(http);
        Assert.Contains("plain", models.Keys);
        Assert.Contains("tone@production", models.Keys);
        Assert.Contains("tone@3", models.Keys);
        Assert.DoesNotContain("unpromoted@production", models.Keys);

        var staging = await Chat(http, "tone@staging");
        Assert.Equal(404, staging.Code);
        Assert.Contains("no alias 'staging'", staging.Message);
        Assert.Contains("production (v1)", staging.Message);
        Assert.Equal("model", staging.Body?["error"]?["param"]?.GetValue<string>());
        var missing = await Chat(http, "tone@99");
        Assert.Equal(404, missing.Code);
        Assert.Contains("3 versions, 1 to 3", missing.Message);
        Assert.Equal(404, (await Chat(http, "nobody@production")).Code);
        var alone = await Chat(http, "unpromoted");
        Assert.Equal(404, alone.Code);
        Assert.Contains("unpromoted@production", alone.Message);
        Assert.Contains("version 1", alone.Message);
        foreach (var malformed in new[] { "tone@", "tone@0", "to ne@1", "tone@a/b" })
        {
            var r = await Chat(http, malformed);
            Assert.True(r.Code == 400, $"{malformed}: {r.Code} {r.Message}");
        }

        var damaged = await Chat(http, "tone@3");
        Assert.Equal(503, damaged.Code);
        Assert.Contains("tone@3", damaged.Message);
        Assert.DoesNotContain(reg, damaged.Message); // no server paths
        Assert.Equal("server_error", damaged.Body?["error"]?["type"]?.GetValue<string>());
        Assert.Equal(200, (await Chat(http, "tone@2")).Code); // the damage is that version's alone

        // A writer holding the registry's write lock (say a long `registry add` in another process) does not hold up
        // requests: WAL readers never wait for it (a 404 reads the database three times and generates nothing).
        using (var writer = new SqliteConnection($"Data Source={Path.Combine(reg, AdapterStore.DbFile)};Pooling=False"))
        {
            writer.Open();
            using var tx = writer.BeginTransaction(); // BEGIN IMMEDIATE: the write lock
            using (var cmd = writer.CreateCommand())
            {
                cmd.Transaction = tx;
                cmd.CommandText = "INSERT INTO meta(key, value) VALUES ('held', 'by the test')";
                cmd.ExecuteNonQuery();
            }
            var sw = Stopwatch.StartNew();
            Assert.Equal(404, (await Chat(http, "tone@staging")).Code);
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(2), $"a request waited {sw.ElapsedMilliseconds} ms for a writer");
            tx.Rollback();
        }

        var other = await Chat(http, "alien");
        Assert.Equal(422, other.Code);
        Assert.Contains("another base model", other.Message);
    }

    [Fact]
    public void ServeHelpNamesTheRegistryAndServeNeedsAdaptersOrARegistry()
    {
        var (code, stdout, stderr) = CliTests.RunCli("serve", "--help");
        Assert.True(code == 0, stderr);
        Assert.Contains("--registry", stdout);
        Assert.Contains("NAME@production", stdout);
        var empty = Path.Combine(Fixtures.TempDir(), "no-registry");
        (code, _, stderr) = CliTests.RunCli("serve", "--model", Fixtures.Model("llama"), "--registry", empty, "--port", "0");
        Assert.Equal(1, code);
        Assert.Contains("no registry at", stderr);
        Assert.False(Directory.Exists(empty)); // a server never creates a registry
    }

    // ---- helpers ----

    sealed record Reply(int Code, string Text, string Version, string Message, JsonNode? Body);

    static HttpRequestMessage ChatRequest(string model, bool stream = false) => new(HttpMethod.Post, "/v1/chat/completions")
    {
        Content = new StringContent(JsonSerializer.Serialize(new
        {
            model, messages = new[] { new { role = "user", content = Prompt } }, max_tokens = 24, temperature = 0, ignore_eos = true, stream,
        }), Encoding.UTF8, "application/json"),
    };

    static string VersionOf(HttpResponseMessage r) => r.Headers.TryGetValues(OpenAiServer.ServedVersionHeader, out var v) ? v.Single() : "";

    static async Task<Reply> Chat(HttpClient http, string model)
    {
        using var res = await http.SendAsync(ChatRequest(model));
        var body = JsonNode.Parse(await res.Content.ReadAsStringAsync());
        return new((int)res.StatusCode, body?["choices"]?[0]?["message"]?["content"]?.GetValue<string>() ?? "", VersionOf(res),
            body?["error"]?["message"]?.GetValue<string>() ?? "", body);
    }

    static async Task<string> ReadStream(StreamReader reader)
    {
        var text = new StringBuilder();
        while (await reader.ReadLineAsync() is { } line)
        {
            if (!line.StartsWith("data: ") || line == "data: [DONE]") continue;
            var chunk = JsonNode.Parse(line["data: ".Length..])!;
            Assert.Null(chunk["error"]);
            text.Append(chunk["choices"]?[0]?["delta"]?["content"]?.GetValue<string>());
        }
        reader.Dispose();
        return text.ToString();
    }

    /// <summary>
    /// Sends "tone" (one request at a time) until the answer is <paramref name="expected"/>; returns when the first request
    /// so answered was sent, counted from the call (the switch latency: generation time under a loaded CPU is not part of
    /// it), and when its answer arrived.
    /// </summary>
    async Task<(TimeSpan Sent, TimeSpan Answered)> PollUntil(HttpClient http, string expected)
    {
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < TimeSpan.FromSeconds(20))
        {
            var sent = sw.Elapsed;
            var r = await Chat(http, "tone");
            Assert.Equal(200, r.Code);
            if (r.Text == expected) return (sent, sw.Elapsed);
        }
        throw new TimeoutException($"no answer '{expected}' within 20 s");
    }

    static async Task<Dictionary<string, JsonNode>> Models(HttpClient http)
    {
        var list = JsonNode.Parse(await http.GetStringAsync("/v1/models"))!["data"]!.AsArray();
        return list.ToDictionary(m => m!["id"]!.GetValue<string>(), m => m!);
    }

    /// <summary>A copy of llama/a whose weights record another base's fingerprint (as LoraKit writes it when it trains).</summary>
    static string OnAnotherBase(string dir)
    {
        Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", "a"), dir);
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        var tensors = new Dictionary<string, Tensor>();
        using (var f = SafetensorsFile.Open(path))
            foreach (var name in f.Entries.Keys) tensors[name] = f.Read(name);
        SafetensorsWriter.Save(path, tensors, new Dictionary<string, string> { [LoraKit.Models.BaseFingerprint.MetadataKey] = new string('0', 64), [LoraKit.Models.BaseFingerprint.ModelTypeKey] = "llama" });
        return dir;
    }
}
