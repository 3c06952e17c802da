using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Threading.Channels;
using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Serving;
using LoraKit.Tokenization;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace LoraKit.Cli.Serving;

/// <summary>
/// OpenAI-compatible HTTP API over one <see cref="InferenceEngine"/>: /v1/chat/completions, /v1/completions (both with
/// SSE streaming), /v1/models; /admin/adapters to load, reload and unload adapters; /health without a key.
/// The request's "model" picks the base ("base" or its name) or an adapter by name.
/// </summary>
public sealed class OpenAiServer : IAsyncDisposable
{
    readonly ServerOptions _o;
    readonly InferenceEngine _engine;
    readonly AdapterRegistry _registry;
    readonly string _baseName;
    readonly int[] _eos;
    readonly ChatTemplate? _template;
    readonly SemaphoreSlim _slots;
    int _waiting;
    WebApplication? _app;

    public string Url { get; private set; } = "";

    OpenAiServer(ServerOptions o, InferenceEngine engine, AdapterRegistry registry, int[] eos)
    {
        _o = o; _engine = engine; _registry = registry; _eos = eos;
        _baseName = o.ModelName ?? Path.GetFileName(Path.GetFullPath(o.Model).TrimEnd(Path.DirectorySeparatorChar));
        _template = engine.Tokenizer.Config.ChatTemplate is string t ? new ChatTemplate(t) : null;
        _slots = new SemaphoreSlim(o.MaxConcurrent, o.MaxConcurrent);
    }

    /// <summary>Loads the base model once, starts the engine and Kestrel; returns when the server listens.</summary>
    public static async Task<OpenAiServer> StartAsync(ServerOptions o)
    {
        if (!Directory.Exists(o.Adapters)) throw new DirectoryNotFoundException($"adapters directory '{o.Adapters}' does not exist");
        var device = Devices.Resolve(o.Device);
        var dtype = o.Dtype is string d ? IO.DTypes.Parse(d) : Devices.DefaultDType(device);
        var tok = Tokenizer.Load(o.Model);
        var lm = new LoraModel(CausalLM.Load(o.Model, dtype, device));
        var eos = GenerationDefaults.EosTokenIds(o.Model, lm.Model.Config)
            .Concat(tok.EosTokenId is int id ? [id] : Array.Empty<int>()).Distinct().ToArray();
        var engine = new InferenceEngine(lm, tok, o.MaxBatch);
        var server = new OpenAiServer(o, engine, new AdapterRegistry(engine, o.Adapters, o.MaxLoadedAdapters), eos);
        await server.StartHttpAsync();
        return server;
    }

    public InferenceEngine Engine => _engine;

    async Task StartHttpAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Limits.MaxRequestBodySize = _o.MaxBodyBytes);
        builder.WebHost.UseUrls($"http://{_o.Host}:{_o.Port}");
        var app = builder.Build();
        app.Use(Authorize);
        app.MapGet("/health", () => Results.Json(new { status = "ok" }));
        app.MapGet("/v1/models", Models);
        app.MapPost("/v1/completions", (HttpContext c) => Complete(c, chat: false));
        app.MapPost("/v1/chat/completions", (HttpContext c) => Complete(c, chat: true));
        app.MapPost("/v1/classify", new ClassifyEndpoint(_engine, _registry, _o, _baseName).Handle); // a user route (LoraKit extension)
        app.MapGet("/admin/adapters", () => Results.Json(new { available = _registry.Available(), loaded = _registry.Loaded }));
        app.MapPost("/admin/adapters/{name}/load", (string name) => Admin(() => _registry.LoadAsync(name, reload: false), name, "loaded"));
        app.MapPost("/admin/adapters/{name}/reload", (string name) => Admin(() => _registry.LoadAsync(name, reload: true), name, "reloaded"));
        app.MapDelete("/admin/adapters/{name}", (string name) => Admin(() => _registry.UnloadAsync(name), name, "unloaded"));
        await app.StartAsync();
        _app = app;
        Url = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
    }

    // ---- auth ----

    async Task Authorize(HttpContext c, Func<Task> next)
    {
        var path = c.Request.Path.Value ?? "";
        if (path == "/health" || (_o.ApiKey is null && _o.AdminKey is null)) { await next(); return; }
        string? key = c.Request.Headers.Authorization.ToString() is var h && h.StartsWith("Bearer ", StringComparison.Ordinal) ? h[7..].Trim() : null;
        bool admin = _o.AdminKey is string ak && key is not null && SameKey(key, ak);
        bool user = _o.ApiKey is string uk && key is not null && SameKey(key, uk);
        if (path.StartsWith("/admin", StringComparison.Ordinal))
        {
            if (admin) { await next(); return; }
            await Error(c, key is null || !user ? 401 : 403, key is null ? "missing API key (Authorization: Bearer …)" : user ? "this key may not use admin endpoints" : "invalid API key", "authentication_error");
            return;
        }
        if (user || admin || _o.ApiKey is null) { await next(); return; }
        await Error(c, 401, key is null ? "missing API key (Authorization: Bearer …)" : "invalid API key", "authentication_error");
    }

    /// <summary>Constant-time comparison (of fixed-length digests, so lengths do not leak either).</summary>
    static bool SameKey(string given, string expected) =>
        CryptographicOperations.FixedTimeEquals(SHA256.HashData(Encoding.UTF8.GetBytes(given)), SHA256.HashData(Encoding.UTF8.GetBytes(expected)));

    static Task Error(HttpContext c, int status, string message, string type = "invalid_request_error", string? param = null)
    {
        c.Response.StatusCode = status;
        return c.Response.WriteAsJsonAsync(ErrorBody(message, param, type));
    }

    sealed class ApiError(int status, string message, string? param = null) : Exception(message)
    {
        public int Status { get; } = status;
        public string? Param { get; } = param;
    }

    // ---- endpoints ----

    IResult Models()
    {
        var data = new List<object> { new { id = _baseName, @object = "model", created = 0, owned_by = "lorakit" } };
        data.AddRange(_registry.Available().Select(a => new { id = a, @object = "model", created = 0, owned_by = "lorakit", parent = _baseName }));
        return Results.Json(new { @object = "list", data });
    }

    async Task<IResult> Admin(Func<Task> op, string name, string verb)
    {
        try { await op(); return Results.Json(new { adapter = name, status = verb, loaded = _registry.Loaded }); }
        catch (AdapterNameException e) { return Results.Json(ErrorBody(e.Message), statusCode: 400); }
        catch (KeyNotFoundException e) { return Results.Json(ErrorBody(e.Message), statusCode: 404); }
        catch (InvalidOperationException e) { return Results.Json(ErrorBody(e.Message), statusCode: 409); }
        catch (Exception e) when (e is InvalidDataException or LoraConfigException or IO.SafetensorsException or FileNotFoundException)
        {
            return Results.Json(ErrorBody($"adapter '{name}' refused: {e.Message}"), statusCode: 422);
        }
    }

    /// <summary>OpenAI's error object.</summary>
    static object ErrorBody(string message, string? param = null, string type = "invalid_request_error") =>
        new { error = new { message, type, param, code = (string?)null } };

    async Task Complete(HttpContext c, bool chat)
    {
        // Queue, then 429: at most MaxConcurrent generate, MaxQueued wait.
        if (Interlocked.Increment(ref _waiting) > _o.MaxConcurrent + _o.MaxQueued)
        {
            Interlocked.Decrement(ref _waiting);
            await Error(c, 429, "too many requests in flight; retry later", "rate_limit_error");
            return;
        }
        IDisposable? adapterLease = null;
        bool slot = false;
        try
        {
            JsonObject body;
            try { body = await JsonNode.ParseAsync(c.Request.Body) as JsonObject ?? throw new ApiError(400, "the body must be a JSON object"); }
            catch (JsonException e) { throw new ApiError(400, $"invalid JSON: {e.Message}"); }
            catch (BadHttpRequestException e) when (e.StatusCode == 413) { throw new ApiError(413, $"request body exceeds {_o.MaxBodyBytes} bytes"); }

            var (adapter, modelName) = ResolveModel(body);
            if (adapter != null && ClassifyEndpoint.RefuseGeneration(_registry, adapter) is string why) throw new ApiError(400, why, "model");
            var (prompt, promptIds) = chat ? ChatPrompt(body) : TextPrompt(body);
            if (promptIds.Length > _o.MaxPromptTokens) throw new ApiError(400, $"the prompt has {promptIds.Length} tokens; the limit is {_o.MaxPromptTokens}", chat ? "messages" : "prompt");
            var options = Sampling(body, chat);
            bool stream = body["stream"]?.GetValue<bool>() ?? false;
            bool includeUsage = body["stream_options"]?["include_usage"]?.GetValue<bool>() ?? false;

            if (adapter != null) adapterLease = await AcquireAdapter(adapter);
            await _slots.WaitAsync(c.RequestAborted);
            slot = true;

            string id = (chat ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N")[..24];
            long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
            if (!stream)
            {
                var r = await _engine.GenerateAsync(promptIds, adapter, options, null, c.RequestAborted);
                await c.Response.WriteAsJsonAsync(Body(chat, id, created, modelName, r, promptIds.Length));
                return;
            }
            await Stream(c, chat, id, created, modelName, promptIds, adapter, options, includeUsage);
        }
        catch (ApiError e) { await Error(c, e.Status, e.Message, e.Status == 429 ? "rate_limit_error" : "invalid_request_error", e.Param); }
        catch (OperationCanceledException) when (c.RequestAborted.IsCancellationRequested) { }
        finally
        {
            if (slot) _slots.Release();
            adapterLease?.Dispose();
            Interlocked.Decrement(ref _waiting);
        }
    }

    async Task<IDisposable> AcquireAdapter(string adapter)
    {
        try { return await _registry.AcquireAsync(adapter); }
        catch (AdapterNameException e) { throw new ApiError(400, e.Message, "model"); }
        catch (KeyNotFoundException e) { throw new ApiError(404, $"{e.Message} (see /v1/models)", "model"); }
        catch (InvalidOperationException e) { throw new ApiError(429, e.Message, "model"); }
        catch (Exception e) when (e is InvalidDataException or LoraConfigException or IO.SafetensorsException or FileNotFoundException)
        {
            throw new ApiError(422, $"adapter '{adapter}' cannot be used with this base model: {e.Message}", "model");
        }
    }

    (string? adapter, string name) ResolveModel(JsonObject body)
    {
        var model = body["model"]?.GetValue<string>() ?? throw new ApiError(400, "missing \"model\"", "model");
        if (model == "base" || model == _baseName) return (null, _baseName);
        return (model, model);
    }

    (string, int[]) TextPrompt(JsonObject body)
    {
        var prompt = body["prompt"] switch
        {
            JsonValue v when v.TryGetValue<string>(out var s) => s,
            JsonArray { Count: 1 } a when a[0] is JsonValue v1 && v1.TryGetValue<string>(out var s1) => s1,
            null => throw new ApiError(400, "missing \"prompt\"", "prompt"),
            _ => throw new ApiError(400, "\"prompt\" must be a string (one prompt per request)", "prompt"),
        };
        var ids = _engine.Tokenizer.Encode(prompt);
        if (ids.Length == 0) throw new ApiError(400, "the prompt is empty", "prompt");
        return (prompt, ids);
    }

    (string, int[]) ChatPrompt(JsonObject body)
    {
        if (body["messages"] is not JsonArray { Count: > 0 } messages) throw new ApiError(400, "\"messages\" must be a non-empty array", "messages");
        if (_template is null) throw new ApiError(400, "this model has no chat template; use /v1/completions", "messages");
        foreach (var m in messages)
            if (m?["role"]?.GetValue<string>() is not ("system" or "user" or "assistant" or "tool") || m["content"] is null)
                throw new ApiError(400, "each message needs a role (system, user, assistant, tool) and content", "messages");
        string text;
        try
        {
            using var doc = JsonDocument.Parse(messages.ToJsonString());
            text = _template.Render(doc.RootElement, addGenerationPrompt: true, _engine.Tokenizer.Config);
        }
        catch (Templating.TemplateException e) { throw new ApiError(400, e.Message, "messages"); }
        return (text, _engine.Tokenizer.Encode(text, addSpecialTokens: false));
    }

    SamplingOptions Sampling(JsonObject body, bool chat)
    {
        double Num(string key, double dflt) => body[key] is JsonValue v && v.TryGetValue<double>(out var d) ? d : body[key] is null ? dflt
            : throw new ApiError(400, $"\"{key}\" must be a number", key);
        int maxTokens = (int)Num(chat && body["max_completion_tokens"] != null ? "max_completion_tokens" : "max_tokens", chat ? Math.Min(_o.MaxTokens, 256) : 16);
        if (maxTokens < 1 || maxTokens > _o.MaxTokens) throw new ApiError(400, $"max_tokens must be between 1 and {_o.MaxTokens}", "max_tokens");
        double temperature = Num("temperature", 1.0);
        if (temperature is < 0 or > 2) throw new ApiError(400, "temperature must be between 0 and 2", "temperature");
        double topP = Num("top_p", 1.0);
        if (topP is <= 0 or > 1) throw new ApiError(400, "top_p must be in (0, 1]", "top_p");
        if (body["n"] is JsonValue n && n.GetValue<int>() != 1) throw new ApiError(400, "only n = 1 is supported", "n");
        var stops = body["stop"] switch
        {
            null => [],
            JsonValue v when v.TryGetValue<string>(out var s) => [s],
            JsonArray a => a.Select(x => x?.GetValue<string>() ?? "").ToList(),
            _ => throw new ApiError(400, "\"stop\" must be a string or an array of strings", "stop"),
        };
        if (stops.Count > _o.MaxStopStrings) throw new ApiError(400, $"at most {_o.MaxStopStrings} stop strings", "stop");
        if (stops.Any(s => s.Length == 0)) throw new ApiError(400, "stop strings must not be empty", "stop");
        long? seed = body["seed"] is JsonValue sv ? sv.GetValue<long>() : null;
        // vLLM's extension: generate max_tokens whatever the model says (benchmarks, load tests).
        bool ignoreEos = body["ignore_eos"] switch
        {
            null => false,
            JsonValue v when v.TryGetValue<bool>(out var b) => b,
            _ => throw new ApiError(400, "\"ignore_eos\" must be true or false", "ignore_eos"),
        };
        return new SamplingOptions { MaxNewTokens = maxTokens, Temperature = temperature, TopP = topP, Seed = seed, StopStrings = stops, EosTokenIds = ignoreEos ? [] : _eos };
    }

    static object Usage(int prompt, int completion) => new { prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion };

    static string Finish(FinishReason r) => r == FinishReason.Stop ? "stop" : "length";

    static object Body(bool chat, string id, long created, string model, GenerationResult r, int promptTokens) => chat
        ? new
        {
            id, @object = "chat.completion", created, model,
            choices = new[] { new { index = 0, message = new { role = "assistant", content = r.Text }, finish_reason = Finish(r.FinishReason) } },
            usage = Usage(promptTokens, r.OutputIds.Length),
        }
        : new
        {
            id, @object = "text_completion", created, model,
            choices = new[] { new { index = 0, text = r.Text, logprobs = (object?)null, finish_reason = Finish(r.FinishReason) } },
            usage = Usage(promptTokens, r.OutputIds.Length),
        };

    /// <summary>Server-sent events in OpenAI's chunk format, ending with "data: [DONE]".</summary>
    async Task Stream(HttpContext c, bool chat, string id, long created, string model, int[] promptIds, string? adapter, SamplingOptions options, bool includeUsage)
    {
        c.Response.ContentType = "text/event-stream";
        c.Response.Headers.CacheControl = "no-cache";
        var pieces = Channel.CreateUnbounded<string>();
        var task = _engine.GenerateAsync(promptIds, adapter, options, p => pieces.Writer.TryWrite(p), c.RequestAborted);
        _ = task.ContinueWith(_ => pieces.Writer.TryComplete(), TaskScheduler.Default);
        async Task Send(object chunk)
        {
            await c.Response.WriteAsync("data: " + JsonSerializer.Serialize(chunk) + "\n\n");
            await c.Response.Body.FlushAsync();
        }
        object Chunk(string? text, string? finish, bool first) => chat
            ? new { id, @object = "chat.completion.chunk", created, model, choices = new[] { new { index = 0, delta = (object)(first ? new { role = "assistant", content = text ?? "" } : text is null ? new { } : new { content = text }), finish_reason = finish } } }
            : new { id, @object = "text_completion", created, model, choices = new[] { new { index = 0, text = text ?? "", logprobs = (object?)null, finish_reason = finish } } };
        if (chat) await Send(Chunk("", null, first: true));
        await foreach (var piece in pieces.Reader.ReadAllAsync(c.RequestAborted)) await Send(Chunk(piece, null, first: false));
        var result = await task;
        await Send(Chunk(null, Finish(result.FinishReason), first: false));
        if (includeUsage)
            await Send(new { id, @object = chat ? "chat.completion.chunk" : "text_completion", created, model, choices = Array.Empty<object>(), usage = Usage(promptIds.Length, result.OutputIds.Length) });
        await c.Response.WriteAsync("data: [DONE]\n\n");
    }

    public async ValueTask DisposeAsync()
    {
        if (_app != null) { await _app.StopAsync(); await _app.DisposeAsync(); }
        _engine.Dispose();
    }
}
