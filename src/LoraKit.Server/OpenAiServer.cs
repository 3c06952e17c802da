using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using System.Threading.Channels;
using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Registry;
using LoraKit.Runtime;
using LoraKit.Serving;
using LoraKit.Tokenization;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace LoraKit.Server;

/// <summary>
/// OpenAI-compatible HTTP API over one <see cref="InferenceEngine"/>: /v1/chat/completions, /v1/completions (both with
/// SSE streaming), /v1/models; /admin/adapters to load, reload and unload adapters; /health without a key; /metrics
/// (Prometheus text: the engine's <see cref="ServingMetrics"/> and the server's HTTP counts) with a user key unless
/// <see cref="ServerOptions.MetricsPublic"/>.
/// The request's "model" picks the base ("base" or its name), an adapter directory by name, or, with
/// <see cref="ServerOptions.Registry"/>, a registered version (<see cref="RegistryModels"/>: NAME@VERSION, NAME@ALIAS, NAME).
/// Contract: every error is OpenAI's error object (a 4xx naming the field in "param" for bad requests; a 500 only for a
/// defect, saying no more than that); keys are checked on the matched endpoint (<see cref="Access"/>); client-facing
/// messages carry no server paths; <see cref="DisposeAsync"/> drains in-flight requests for a bounded time, while /health
/// answers 503 "draining" and new generation requests 503, so a load balancer moves traffic elsewhere.
/// </summary>
public sealed partial class OpenAiServer : IAsyncDisposable
{
    readonly ServerOptions _o;
    readonly InferenceEngine _engine;
    readonly AdapterRegistry _registry;
    readonly RegistryModels? _models; // serving from the adapter registry (ServerOptions.Registry), else null
    readonly string _baseName;
    readonly int[] _eos;
    readonly ChatTemplate? _template;
    readonly SemaphoreSlim _slots;
    readonly BodyGate _bodies;
    int _waiting;
    int _inFlight; // HTTP requests in the pipeline (what a drain waits for)
    volatile bool _draining;
    Task? _stopping;
    readonly object _stopLock = new();
    readonly HttpMetrics _httpMetrics = new();
    WebApplication? _app;

    /// <summary>The address the server listens on (e.g. <c>http://127.0.0.1:8000</c>; with port 0, the port chosen).</summary>
    public string Url { get; private set; } = "";

    OpenAiServer(ServerOptions o, InferenceEngine engine, AdapterRegistry registry, int[] eos, RegistryModels? models)
    {
        _o = o; _engine = engine; _registry = registry; _eos = eos; _models = models;
        _baseName = BaseName(o);
        _template = ChatTemplate.Of(engine.Tokenizer);
        _slots = new SemaphoreSlim(o.MaxConcurrent, o.MaxConcurrent);
        _bodies = new BodyGate(4 * (o.MaxConcurrent + o.MaxQueued), o.BodyTimeout);
    }

    /// <summary>
    /// Hosts the server in this process: loads the base model once, starts the engine and Kestrel, and returns when the
    /// server listens on <see cref="Url"/>. <see cref="DisposeAsync"/> (or <see cref="StopAsync"/>) stops it. Refuses
    /// (a <see cref="LoraKitException"/>) a non-loopback host without any key unless <see cref="ServerOptions.Insecure"/>.
    /// </summary>
    public static async Task<OpenAiServer> StartAsync(ServerOptions o)
    {
        if (o.ApiKey is null && o.AdminKey is null && !o.Insecure && !o.IsLoopback)
            throw new LoraKitException($"refusing to listen on '{o.Host}' without a key: anyone who can reach it could use and administer the server; " +
                                       "set an API key and an admin key (ApiKey, AdminKey; lorakit serve: --api-key, --admin-key), or allow it (Insecure; --insecure)");
        CheckKeyShape(o.ApiKey, "API key (ApiKey; lorakit serve: --api-key or LORAKIT_API_KEY)");
        CheckKeyShape(o.AdminKey, "admin key (AdminKey; lorakit serve: --admin-key or LORAKIT_ADMIN_KEY)");
        if (o.Adapters is null && o.Registry is null) throw new LoraKitException("give an adapters directory, a registry, or both (Adapters, Registry; lorakit serve: --adapters, --registry)");
        if (o.Adapters is not null && !Directory.Exists(o.Adapters)) throw new DirectoryNotFoundException($"adapters directory '{o.Adapters}' does not exist");
        var reader = o.Registry is null ? null : RegistryReader.Open(o.Registry);
        try
        {
            var (device, dtype) = Placement.Resolve(o.Device, o.Dtype);
            var tok = Tokenizer.Load(o.Model);
            var lm = new LoraModel(CausalLM.Load(o.Model, dtype, device, o.Quantize));
            var eos = StopTokens.EosTokenIds(lm.Model.Config, tok, o.Model);
            var engine = new InferenceEngine(lm, tok, new EngineOptions
            {
                MaxBatch = o.MaxBatch, KvCacheMemory = o.KvCacheMemory, MaxTokensPerStep = Math.Max(o.MaxTokensPerStep, o.MaxBatch), CudaGraphs = o.CudaGraphs,
            });
            var baseName = BaseName(o);
            var models = reader is null ? null : new RegistryModels(reader, baseName, lm.Model.Fingerprint, o.AllowBaseMismatch);
            var adapters = new AdapterRegistry(engine, o.Adapters, o.MaxLoadedAdapters)
            {
                AllowBaseMismatch = o.AllowBaseMismatch, External = models is null ? null : models.Checkout, MaxHostAdapters = o.MaxHostAdapters,
                OnCacheOutcome = engine.Metrics.AdapterCache, OnEvicted = engine.Metrics.AdapterEvicted,
            };
            var server = new OpenAiServer(o, engine, adapters, eos, models);
            await server.StartHttpAsync();
            return server;
        }
        catch
        {
            reader?.Dispose();
            throw;
        }
    }

    static string BaseName(ServerOptions o) => o.ModelName ?? Path.GetFileName(Path.GetFullPath(o.Model).TrimEnd(Path.DirectorySeparatorChar));

    /// <summary>
    /// A key a client can send in a Bearer header: printable ASCII without spaces. An empty key (an empty environment
    /// variable) or one with padding or control characters would lock every client out while looking configured.
    /// </summary>
    static void CheckKeyShape(string? key, string what)
    {
        if (key is null) return;
        if (key.Length == 0) throw new LoraKitException($"the {what} is empty; set a key or leave it unset");
        if (key.Any(ch => ch is <= ' ' or > '~'))
            throw new LoraKitException($"the {what} must be printable ASCII without spaces (it has whitespace, control or non-ASCII characters, which no client could send in a Bearer header)");
    }

    /// <summary>The engine behind the endpoints (for in-process use beside HTTP, e.g. a <see cref="LoraKitChatClient"/>).</summary>
    public InferenceEngine Engine => _engine;

    /// <summary>The same as <see cref="DisposeAsync"/>: drains in-flight requests, then stops Kestrel and the engine.</summary>
    public Task StopAsync() => DisposeAsync().AsTask();

    async Task StartHttpAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        // Signals are the command's business (serve drains on SIGINT and SIGTERM); the host must not stop itself.
        builder.Services.AddSingleton<IHostLifetime, CallerOwnedLifetime>();
        builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = _o.DrainTimeout);
        builder.WebHost.ConfigureKestrel(k => k.Limits.MaxRequestBodySize = _o.MaxBodyBytes);
        builder.WebHost.UseUrls($"http://{_o.Host}:{_o.Port}");
        var app = builder.Build();
        app.Use(Outermost);
        app.UseRouting();
        app.Use(Authorize); // after routing: it reads the matched endpoint's access level, never the raw path
        app.Use(RefuseWhileDraining);
        app.MapGet("/health", () => _draining ? Results.Json(new { status = "draining" }, statusCode: 503) : Results.Json(new { status = "ok" }))
            .WithMetadata(new AccessMetadata(Access.Public));
        app.MapGet("/metrics", Metrics).WithMetadata(new AccessMetadata(_o.MetricsPublic ? Access.Public : Access.User));
        app.MapGet("/v1/models", Models).WithMetadata(new AccessMetadata(Access.User));
        app.MapPost("/v1/completions", (HttpContext c) => Complete(c, chat: false)).WithMetadata(new AccessMetadata(Access.User), Work.Instance);
        app.MapPost("/v1/chat/completions", (HttpContext c) => Complete(c, chat: true)).WithMetadata(new AccessMetadata(Access.User), Work.Instance);
        app.MapPost("/v1/classify", new ClassifyEndpoint(_engine, _registry, _o, _baseName, _bodies).Handle).WithMetadata(new AccessMetadata(Access.User), Work.Instance); // LoraKit extension
        app.MapGet("/admin/adapters", () => Results.Json(new { available = _registry.Available(), loaded = _registry.Loaded })).WithMetadata(new AccessMetadata(Access.Admin));
        app.MapPost("/admin/adapters/{name}/load", (string name) => Admin(() => _registry.LoadAsync(name, reload: false), name, "loaded")).WithMetadata(new AccessMetadata(Access.Admin));
        app.MapPost("/admin/adapters/{name}/reload", (string name) => Admin(() => _registry.LoadAsync(name, reload: true), name, "reloaded")).WithMetadata(new AccessMetadata(Access.Admin));
        app.MapDelete("/admin/adapters/{name}", (string name) => Admin(() => _registry.UnloadAsync(name), name, "unloaded")).WithMetadata(new AccessMetadata(Access.Admin));
        await app.StartAsync();
        _app = app;
        Url = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
    }

    sealed class CallerOwnedLifetime : IHostLifetime
    {
        public Task WaitForStartAsync(CancellationToken cancellationToken) => Task.CompletedTask;
        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    }

    /// <summary>
    /// First middleware: counts the request in flight (a drain waits for these) and in /metrics, and logs one line per
    /// request; <see cref="Handle"/> turns any error into an OpenAI error object.
    /// </summary>
    async Task Outermost(HttpContext c, Func<Task> next)
    {
        var sw = Stopwatch.StartNew();
        Interlocked.Increment(ref _inFlight);
        try { await Handle(c, next); }
        finally
        {
            Count(c);
            Interlocked.Decrement(ref _inFlight);
        }
        if (_o.Log is { } log)
        {
            var items = c.Items;
            log($"{DateTime.UtcNow:yyyy-MM-ddTHH:mm:ssZ} {c.Request.Method} {RouteOf(c)} model={Printable(items["model"] as string ?? "-").Replace(' ', '_')} status={c.Response.StatusCode} " +
                $"prompt_tokens={items["prompt_tokens"] ?? 0} completion_tokens={items["completion_tokens"] ?? 0} ms={sw.ElapsedMilliseconds}");
        }
    }

    /// <summary>The request's line in lorakit_http_requests_total (499 when the client left before any answer), and a 429 as rate_limited.</summary>
    void Count(HttpContext c)
    {
        int status = c.RequestAborted.IsCancellationRequested && !c.Response.HasStarted ? 499 : c.Response.StatusCode;
        _httpMetrics.Request(c.GetEndpoint() is RouteEndpoint r && r.RoutePattern.RawText is string p ? p : "unmatched", status);
        if (status == 429) _httpMetrics.Rejected("rate_limited");
    }

    /// <summary>
    /// Any error becomes an OpenAI error object (never an empty body, never a stack trace or a server path); an unexpected
    /// exception is a 500 that says only that, and is logged in full.
    /// </summary>
    async Task Handle(HttpContext c, Func<Task> next)
    {
        try { await next(); }
        catch (OperationCanceledException) when (c.RequestAborted.IsCancellationRequested) { }
        catch (Exception e)
        {
            if (c.Response.HasStarted) { c.Abort(); }
            else
            {
                c.Response.Clear();
                if (e is BadHttpRequestException b)
                    await Error(c, b.StatusCode, b.StatusCode == 413 ? $"the request body exceeds {_o.MaxBodyBytes} bytes" : "malformed HTTP request");
                else
                {
                    _o.Log?.Invoke($"error: {c.Request.Method} {RouteOf(c)}: {e.GetType().Name}: {e.Message}");
                    await Error(c, 500, "internal server error (see the server log)", "server_error");
                }
            }
        }
        if (!c.Response.HasStarted && c.Response.StatusCode >= 400 && !c.RequestAborted.IsCancellationRequested)
            await Error(c, c.Response.StatusCode, c.Response.StatusCode switch
            {
                404 => $"no such endpoint: {c.Request.Method} {Printable(c.Request.Path.Value)}",
                405 => $"method {Printable(c.Request.Method)} is not allowed on {Printable(c.Request.Path.Value)}",
                415 => "unsupported content type; send application/json",
                _ => $"request failed with status {c.Response.StatusCode}",
            });
    }

    /// <summary>The matched route's pattern (so logs carry no client-chosen text), else the (cleaned, shortened) path.</summary>
    static string RouteOf(HttpContext c) => c.GetEndpoint() is RouteEndpoint r ? r.RoutePattern.RawText ?? "?" : Printable(c.Request.Path.Value);

    static string Printable(string? s)
    {
        s ??= "";
        if (s.Length > 80) s = s[..80] + "…";
        return new string(s.Select(ch => char.IsControl(ch) || ch is '\u2028' or '\u2029' ? '?' : ch).ToArray());
    }

    // ---- auth ----

    /// <summary>Who may call an endpoint: every route carries one as endpoint metadata.</summary>
    public enum Access { Public, User, Admin }

    sealed record AccessMetadata(Access Level);

    /// <summary>
    /// Keys are checked against the matched endpoint's <see cref="Access"/> (routing is case-insensitive, so the raw path
    /// must never decide). With no key configured everything is open (serve warns, and refuses non-loopback addresses).
    /// With any key configured, only /health (and /metrics with <see cref="ServerOptions.MetricsPublic"/>) answers without
    /// one: user routes (/metrics among them) take the API key or the admin key, admin
    /// routes only the admin key (with only an API key configured, admin routes are closed). Unmatched routes count as
    /// user routes, so a caller without a key learns nothing about which paths exist.
    /// </summary>
    async Task Authorize(HttpContext c, Func<Task> next)
    {
        var access = c.GetEndpoint()?.Metadata.GetMetadata<AccessMetadata>()?.Level ?? Access.User;
        if (access == Access.Public || (_o.ApiKey is null && _o.AdminKey is null)) { await next(); return; }
        var (present, key) = BearerKey(c.Request.Headers.Authorization);
        bool admin = key is not null && _o.AdminKey is string ak && SameKey(key, ak);
        bool user = key is not null && _o.ApiKey is string uk && SameKey(key, uk);
        if (access == Access.Admin ? admin : admin || user) { await next(); return; }
        c.Response.Headers.WWWAuthenticate = "Bearer";
        if (!present) await Error(c, 401, "missing API key (send the header Authorization: Bearer <key>)", "authentication_error");
        else if (user) await Error(c, 403, _o.AdminKey is null ? "admin endpoints are disabled: the server has no admin key" : "this key may not use admin endpoints", "permission_error");
        else await Error(c, 401, "invalid API key", "authentication_error");
    }

    /// <summary>The key of an "Authorization: Bearer KEY" header (scheme case-insensitive); present = some header was sent.</summary>
    internal static (bool present, string? key) BearerKey(Microsoft.Extensions.Primitives.StringValues values)
    {
        if (values.Count == 0) return (false, null);
        if (values.Count > 1) return (true, null);
        var h = (values[0] ?? "").Trim();
        if (h.Length == 0) return (false, null);
        int sp = h.IndexOfAny([' ', '\t']);
        if (sp <= 0 || !h[..sp].Equals("Bearer", StringComparison.OrdinalIgnoreCase)) return (true, null);
        var k = h[(sp + 1)..].Trim();
        return (true, k.Length == 0 ? null : k);
    }

    /// <summary>Constant-time comparison (of fixed-length digests, so lengths do not leak either).</summary>
    static bool SameKey(string given, string expected) =>
        CryptographicOperations.FixedTimeEquals(SHA256.HashData(Encoding.UTF8.GetBytes(given)), SHA256.HashData(Encoding.UTF8.GetBytes(expected)));

    static Task Error(HttpContext c, int status, string message, string type = "invalid_request_error", string? param = null)
    {
        c.Response.StatusCode = status;
        return c.Response.WriteAsJsonAsync(ErrorBody(message, param, type));
    }

    /// <summary>
    /// A message from lower layers (adapter and model loading) made fit for a client: the adapters root and the model
    /// directory become relative names, any other absolute path its last segment; the server log keeps the full text.
    /// </summary>
    internal string Scrub(string message)
    {
        var model = Path.GetFullPath(_o.Model).TrimEnd(Path.DirectorySeparatorChar);
        if (_o.Adapters is not null)
        {
            var root = Path.GetFullPath(_o.Adapters).TrimEnd(Path.DirectorySeparatorChar);
            message = message.Replace(root + Path.DirectorySeparatorChar, "").Replace(root, "<adapters>");
        }
        if (_o.Registry is not null)
        {
            var registry = Path.GetFullPath(_o.Registry).TrimEnd(Path.DirectorySeparatorChar);
            message = message.Replace(registry + Path.DirectorySeparatorChar, "").Replace(registry, "<registry>");
        }
        message = message.Replace(model + Path.DirectorySeparatorChar, "").Replace(model, "<model>");
        message = JsonPosition().Replace(message, "");
        return AbsolutePath().Replace(message, m => Path.GetFileName(m.Value.TrimEnd('/')) is { Length: > 0 } f ? f : "<path>");
    }

    /// <summary>System.Text.Json's " Path: $.x | LineNumber: 0 | BytePositionInLine: 13." tail (internal coordinates).</summary>
    [GeneratedRegex(@"\s*(Path: \$\S* \| )?LineNumber: \d+ \| BytePositionInLine: \d+\.?")]
    private static partial Regex JsonPosition();

    [GeneratedRegex(@"(?<![\w.~-])/[^\s'""()\[\],;]+")]
    private static partial Regex AbsolutePath();

    // ---- endpoints ----

    /// <summary>Marks the endpoints that start work on the engine: refused with 503 while the server drains.</summary>
    sealed class Work
    {
        public static readonly Work Instance = new();
    }

    /// <summary>
    /// While draining, new generation (and classification) requests get a 503 with OpenAI's error object and
    /// "Connection: close", so clients and load balancers retry elsewhere; requests already being handled when the drain
    /// began go on (one whose bytes were still on their way is new: it gets the 503, which OpenAI clients retry). Runs
    /// after <see cref="Authorize"/>: a caller without a key learns nothing, not even that the server is stopping.
    /// </summary>
    async Task RefuseWhileDraining(HttpContext c, Func<Task> next)
    {
        if (!_draining || c.GetEndpoint()?.Metadata.GetMetadata<Work>() is null) { await next(); return; }
        _httpMetrics.Rejected("draining");
        c.Response.Headers.Connection = "close";
        c.Response.Headers.RetryAfter = "1";
        await Error(c, 503, "the server is shutting down; retry the request (another instance will take it)", "server_error");
    }

    /// <summary>
    /// Prometheus' text exposition format 0.0.4: the engine's metrics, then the server's. Rendered whole before the first
    /// byte is sent, so a scrape never gets half a page; a failure is a 503 for this scrape, never a 500.
    /// </summary>
    async Task Metrics(HttpContext c)
    {
        string text;
        try
        {
            _httpMetrics.SetInFlight(Volatile.Read(ref _inFlight));
            _httpMetrics.SetDraining(_draining);
            var w = new StringWriter(System.Globalization.CultureInfo.InvariantCulture);
            _engine.Metrics.Write(w);
            _httpMetrics.Write(w);
            text = w.ToString();
        }
        catch (Exception e)
        {
            _o.Log?.Invoke($"error: /metrics: {e.GetType().Name}: {e.Message}");
            await Error(c, 503, "metrics are unavailable right now (see the server log)", "server_error");
            return;
        }
        c.Response.ContentType = PrometheusText.ContentType;
        c.Response.Headers.CacheControl = "no-store";
        await c.Response.WriteAsync(text, c.RequestAborted);
    }

    IResult Models()
    {
        var data = new List<object> { new { id = _baseName, @object = "model", created = 0, owned_by = "lorakit", root = _baseName } };
        data.AddRange(_registry.Available().Select(a => new { id = a, @object = "model", created = 0, owned_by = "lorakit", root = a, parent = _baseName }));
        try { if (_models is not null) data.AddRange(_models.Listing()); }
        catch (Microsoft.Data.Sqlite.SqliteException e) // as in ResolveModel: the registry, not the request, is at fault
        {
            _o.Log?.Invoke($"registry read failed for /v1/models: {e.Message}");
            return Results.Json(ErrorBody("the adapter registry cannot be read right now; retry shortly", null, "server_error"), statusCode: 503);
        }
        return Results.Json(new { @object = "list", data });
    }

    async Task<IResult> Admin(Func<Task> op, string name, string verb)
    {
        try { await op(); return Results.Json(new { adapter = name, status = verb, loaded = _registry.Loaded }); }
        catch (AdapterNameException e) { return Results.Json(ErrorBody(e.Message, "name"), statusCode: 400); }
        catch (KeyNotFoundException e) { return Results.Json(ErrorBody(Scrub(e.Message), "name"), statusCode: 404); }
        catch (InvalidOperationException e) { return Results.Json(ErrorBody(Scrub(e.Message), "name"), statusCode: 409); }
        catch (AdapterUnavailableException e) { return Results.Json(ErrorBody(Scrub(e.Message), "name", "server_error"), statusCode: 503); }
        catch (Exception e) when (IsAdapterFault(e))
        {
            _o.Log?.Invoke($"adapter '{name}' refused: {e.Message}");
            return Results.Json(ErrorBody($"adapter '{name}' refused: {Scrub(e.Message)}", "name"), statusCode: 422);
        }
    }

    /// <summary>Errors that mean "this adapter's files are wrong", not "the server is broken".</summary>
    static bool IsAdapterFault(Exception e) =>
        e is LoraKitException or InvalidDataException or FileNotFoundException or DirectoryNotFoundException or FormatException or System.Text.Json.JsonException;

    /// <summary>OpenAI's error object.</summary>
    static object ErrorBody(string message, string? param = null, string type = "invalid_request_error") =>
        new { error = new { message = WellFormed(message), type, param = param is null ? null : WellFormed(param), code = (string?)null } };

    /// <summary>Unpaired surrogates (which a client may have sent, and which JSON writers refuse) become U+FFFD.</summary>
    static string WellFormed(string s) => Encoding.UTF8.GetString(Encoding.UTF8.GetBytes(s));

    async Task Complete(HttpContext c, bool chat)
    {
        // The body is read before the request takes a place in the queue: clients trickling their bodies (slowloris)
        // must not hold places that complete requests need. Kestrel's minimum body data rate bounds how slow they may be.
        JsonObject body;
        try { body = await ReadBody(c); }
        catch (ApiError e) { await Error(c, e.Status, e.Message, e.Status == 429 ? "rate_limit_error" : "invalid_request_error", e.Param); return; }
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
            var (adapter, modelName, served) = ResolveModel(body);
            if (served is not null)
            {
                if (RegistryModels.IsClassifier(served.Entry))
                    throw new ApiError(400, $"adapter {served.Entry.Ref} is a sequence-classification adapter; /v1/classify takes adapter directory names", "model");
                c.Response.Headers[ServedVersionHeader] = $"{served.Entry.Ref} sha256:{served.Entry.Sha256}";
            }
            else if (adapter != null && ClassifyEndpoint.RefuseGeneration(_registry, adapter) is string why) throw new ApiError(400, why, "model");
            c.Items["model"] = served?.Entry.Ref ?? modelName;
            var request = CompletionRequest.Parse(body, chat, _o);
            var promptIds = chat ? ChatPrompt(body) : TextPrompt(body);
            string promptParam = chat ? "messages" : "prompt";
            c.Items["prompt_tokens"] = promptIds.Length;
            if (promptIds.Length > _o.MaxPromptTokens) throw new ApiError(400, $"the prompt has {promptIds.Length} tokens; the limit is {_o.MaxPromptTokens}", promptParam);
            if (promptIds.Length >= _engine.ContextLength)
                throw new ApiError(400, $"the prompt has {promptIds.Length} tokens, but this model's context is {_engine.ContextLength} tokens for prompt and completion together", promptParam);
            var options = request.Options with { EosTokenIds = request.IgnoreEos ? [] : _eos };

            if (adapter != null) adapterLease = await AcquireAdapter(adapter);
            await _slots.WaitAsync(c.RequestAborted);
            slot = true;

            string id = (chat ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N")[..24];
            long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
            if (!request.Stream)
            {
                var r = await _engine.GenerateAsync(promptIds, adapter, options, null, c.RequestAborted);
                c.Items["completion_tokens"] = r.OutputIds.Length;
                await c.Response.WriteAsJsonAsync(Body(chat, id, created, modelName, r, promptIds.Length));
                return;
            }
            await Stream(c, chat, id, created, modelName, promptIds, adapter, options, request.IncludeUsage);
        }
        catch (ApiError e) { await Error(c, e.Status, e.Message, e.Status == 429 ? "rate_limit_error" : e.Status >= 500 ? "server_error" : "invalid_request_error", e.Param); }
        finally
        {
            if (slot) _slots.Release();
            adapterLease?.Dispose();
            Interlocked.Decrement(ref _waiting);
        }
    }

    /// <summary>The body as a JSON object, or a 400/413 that says what is wrong with it.</summary>
    async Task<JsonObject> ReadBody(HttpContext c)
    {
        byte[] bytes;
        if (!_bodies.TryEnter()) throw new ApiError(429, BodyGate.Busy);
        try
        {
            using var buffer = new MemoryStream();
            using var deadline = _bodies.Deadline(c.RequestAborted);
            await c.Request.Body.CopyToAsync(buffer, deadline.Token);
            bytes = buffer.ToArray();
        }
        catch (OperationCanceledException) when (!c.RequestAborted.IsCancellationRequested) { throw new ApiError(408, _bodies.TooSlow); }
        catch (BadHttpRequestException e) when (e.StatusCode == 413) { throw new ApiError(413, $"the request body exceeds {_o.MaxBodyBytes} bytes"); }
        catch (BadHttpRequestException e) { throw new ApiError(e.StatusCode, BodyFault(e)); }
        catch (IOException) when (!c.RequestAborted.IsCancellationRequested) { throw new ApiError(400, MalformedFraming); } // e.g. a chunk size that overflows
        finally { _bodies.Exit(); }
        if (bytes.AsSpan().Trim(" \t\r\n"u8).Length == 0) throw new ApiError(400, "the request body is empty; send a JSON object");
        if (!System.Text.Unicode.Utf8.IsValid(bytes)) throw new ApiError(400, "the request body is not valid UTF-8");
        JsonNode? node;
        try { node = JsonNode.Parse(bytes, documentOptions: new JsonDocumentOptions { MaxDepth = 64, AllowDuplicateProperties = false }); }
        catch (JsonException e)
        {
            throw new ApiError(400, $"the request body is not valid JSON (line {(e.LineNumber ?? 0) + 1}, byte {(e.BytePositionInLine ?? 0) + 1}): {IO.JsonFiles.Reason(e)}");
        }
        return node as JsonObject ?? throw new ApiError(400, $"the request body must be a JSON object, not {Json.Kind(node)}");
    }

    /// <summary>Bodies arriving at once, and how long one may take (see <see cref="ServerOptions.BodyTimeout"/>).</summary>
    public sealed class BodyGate(int max, TimeSpan timeout)
    {
        int _n;
        public const string Busy = "too many request bodies are arriving at once; retry later";
        public string TooSlow => $"the request body did not arrive within {timeout.TotalSeconds:0.#} s";
        public bool TryEnter()
        {
            if (Interlocked.Increment(ref _n) <= max) return true;
            Interlocked.Decrement(ref _n);
            return false;
        }
        public void Exit() => Interlocked.Decrement(ref _n);
        public CancellationTokenSource Deadline(CancellationToken aborted)
        {
            var cts = CancellationTokenSource.CreateLinkedTokenSource(aborted);
            cts.CancelAfter(timeout);
            return cts;
        }
    }

    /// <summary>Kestrel's IOException for a body whose framing is broken (a chunk size that overflows), said to the client.</summary>
    internal const string MalformedFraming = "the request body's framing is malformed (bad chunked transfer encoding)";

    /// <summary>Kestrel's refusal of a body (other than 413), said to the client.</summary>
    internal static string BodyFault(BadHttpRequestException e) => e.StatusCode == 408
        ? "the request body arrived too slowly or stopped before its declared end"
        : "the request body is malformed HTTP";

    async Task<IDisposable> AcquireAdapter(string adapter)
    {
        try { return await _registry.AcquireAsync(adapter); }
        catch (AdapterNameException e) { throw new ApiError(400, e.Message, "model"); }
        catch (KeyNotFoundException e) { throw new ApiError(404, $"{Scrub(e.Message)} (see /v1/models)", "model"); }
        catch (InvalidOperationException e) { throw new ApiError(429, Scrub(e.Message), "model"); }
        catch (AdapterUnavailableException e)
        {
            _o.Log?.Invoke($"adapter '{adapter}' unavailable: {e.Message}");
            throw new ApiError(503, Scrub(e.Message), "model");
        }
        catch (Exception e) when (IsAdapterFault(e))
        {
            _o.Log?.Invoke($"adapter '{adapter}' refused: {e.Message}");
            throw new ApiError(422, $"adapter '{adapter}' cannot be used with this base model: {Scrub(e.Message)}", "model");
        }
    }

    /// <summary>The response header naming the registry version a request was served with: "NAME@VERSION sha256:HEX".</summary>
    public const string ServedVersionHeader = "X-LoraKit-Adapter";

    /// <summary>
    /// The request's model: the base (adapter null), an adapter directory by name, or a registry version (served non-null;
    /// its engine key is the adapter). An existing adapter directory wins over a registered name of the same spelling.
    /// </summary>
    (string? adapter, string name, RegistryModels.Served? served) ResolveModel(JsonObject body)
    {
        var model = Json.Str(body, "model") ?? throw new ApiError(400, "missing \"model\" (the base model's name, \"base\", or an adapter's name; see /v1/models)", "model");
        if (model.Length == 0) throw new ApiError(400, "\"model\" is empty", "model");
        if (model == "base" || model == _baseName) return (null, _baseName, null);
        if (_models is not null && (model.Contains('@') || !IsDirectoryAdapter(model)))
        {
            RegistryModels.Served? served;
            try { served = _models.Resolve(model); }
            catch (ApiError e) { throw new ApiError(e.Status, Scrub(e.Message), e.Param); }
            catch (Microsoft.Data.Sqlite.SqliteException e)
            {
                _o.Log?.Invoke($"registry read failed for '{Printable(model)}': {e.Message}");
                throw new ApiError(503, "the adapter registry cannot be read right now; retry shortly", "model");
            }
            if (served is not null) return (served.Key, model, served);
        }
        return (model, model, null);
    }

    /// <summary>Whether <paramref name="name"/> (without '@') is an adapter directory of <see cref="ServerOptions.Adapters"/>.</summary>
    bool IsDirectoryAdapter(string name)
    {
        try { _registry.Resolve(name); return true; }
        catch (Exception e) when (e is AdapterNameException or KeyNotFoundException) { return false; }
    }

    int[] TextPrompt(JsonObject body)
    {
        var prompt = body["prompt"] switch
        {
            null => throw new ApiError(400, "missing \"prompt\"", "prompt"),
            JsonValue v when v.GetValueKind() == JsonValueKind.String => Json.Text(v, "prompt"),
            JsonArray { Count: 1 } a when Json.IsString(a[0]) => Json.Text(a[0]!, "prompt"),
            var other => throw new ApiError(400, $"\"prompt\" must be a string (one prompt per request; token ids are not accepted), not {Json.Kind(other)}", "prompt"),
        };
        if (prompt.Length == 0) throw new ApiError(400, "\"prompt\" is empty", "prompt");
        if (prompt.Length > _o.MaxPromptTokens * 64) throw new ApiError(400, $"the prompt is far longer than {_o.MaxPromptTokens} tokens", "prompt");
        var ids = _engine.Tokenizer.Encode(prompt);
        if (ids.Length == 0) throw new ApiError(400, "the prompt encodes to no tokens", "prompt");
        return ids;
    }

    int[] ChatPrompt(JsonObject body)
    {
        var messages = body["messages"] switch
        {
            null => throw new ApiError(400, "missing \"messages\"", "messages"),
            JsonArray { Count: > 0 } a => a,
            JsonArray => throw new ApiError(400, "\"messages\" is empty", "messages"),
            var other => throw new ApiError(400, $"\"messages\" must be an array of messages, not {Json.Kind(other)}", "messages"),
        };
        // A clean copy with only what templates read: role, content (text parts joined), name.
        var clean = new JsonArray();
        for (int i = 0; i < messages.Count; i++)
        {
            string at = $"messages[{i}]";
            if (messages[i] is not JsonObject m) throw new ApiError(400, $"{at} must be an object with \"role\" and \"content\", not {Json.Kind(messages[i])}", at);
            var role = Json.Str(m, "role", $"{at}.role") ?? throw new ApiError(400, $"{at} has no \"role\"", $"{at}.role");
            if (role is not ("system" or "developer" or "user" or "assistant" or "tool"))
                throw new ApiError(400, $"{at}.role must be system, developer, user, assistant or tool", $"{at}.role");
            string content = m["content"] switch
            {
                null when role == "assistant" => "",
                null => throw new ApiError(400, $"{at} has no \"content\"", $"{at}.content"),
                JsonValue v when v.GetValueKind() == JsonValueKind.String => Json.Text(v, $"{at}.content"),
                JsonArray parts => string.Concat(parts.Select((p, k) => p is JsonObject po && Json.Str(po, "type", $"{at}.content[{k}].type") == "text"
                    ? Json.Str(po, "text", $"{at}.content[{k}].text") ?? throw new ApiError(400, $"{at}.content[{k}] has no \"text\"", $"{at}.content[{k}].text")
                    : throw new ApiError(400, $"{at}.content[{k}] must be a text part ({{\"type\": \"text\", \"text\": ...}})", $"{at}.content[{k}]"))),
                var other => throw new ApiError(400, $"{at}.content must be a string or an array of text parts, not {Json.Kind(other)}", $"{at}.content"),
            };
            var item = new JsonObject { ["role"] = role == "developer" ? "system" : role, ["content"] = content };
            if (Json.Str(m, "name", $"{at}.name") is string name) item["name"] = name;
            clean.Add(item);
        }
        if (_template is null) throw new ApiError(400, "this model has no chat template; use /v1/completions", "messages");
        string text;
        try
        {
            using var doc = JsonDocument.Parse(clean.ToJsonString());
            text = _template.Render(doc.RootElement, addGenerationPrompt: true, _engine.Tokenizer.Config);
        }
        catch (LoraKitException e) { throw new ApiError(400, Scrub(e.Message), "messages"); } // the template's own errors and limits
        var ids = _engine.Tokenizer.Encode(text, addSpecialTokens: false);
        if (ids.Length == 0) throw new ApiError(400, "the messages render to no tokens", "messages");
        return ids;
    }

    static object Usage(int prompt, int completion) => new { prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion };

    static string Finish(FinishReason r) => r == FinishReason.Stop ? "stop" : "length";

    static object Body(bool chat, string id, long created, string model, GenerationResult r, int promptTokens) => chat
        ? new
        {
            id, @object = "chat.completion", created, model,
            choices = new[] { new { index = 0, message = new { role = "assistant", content = r.Text }, logprobs = (object?)null, finish_reason = Finish(r.FinishReason) } },
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
        GenerationResult result;
        try { result = await task; }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // The status line is sent already: the error travels as an event, as OpenAI's own streams do.
            _o.Log?.Invoke($"error: stream {id}: {e.GetType().Name}: {e.Message}");
            await Send(ErrorBody("generation failed (see the server log)", null, "server_error"));
            await c.Response.WriteAsync("data: [DONE]\n\n");
            return;
        }
        c.Items["completion_tokens"] = result.OutputIds.Length;
        await Send(Chunk(null, Finish(result.FinishReason), first: false));
        if (includeUsage)
            await Send(new { id, @object = chat ? "chat.completion.chunk" : "text_completion", created, model, choices = Array.Empty<object>(), usage = Usage(promptIds.Length, result.OutputIds.Length) });
        await c.Response.WriteAsync("data: [DONE]\n\n");
    }

    /// <summary>
    /// Drains, then stops: for up to <see cref="ServerOptions.DrainTimeout"/> in-flight requests finish while the server
    /// still listens, /health answers 503 "draining" and new generation requests get 503 (a load balancer's health check
    /// sees it and sends elsewhere); then Kestrel stops (connections still open are closed at the deadline) and the engine
    /// with it. Calling it again waits for the same stop.
    /// </summary>
    public ValueTask DisposeAsync()
    {
        lock (_stopLock) _stopping ??= StopOnceAsync(); // draining is on when this returns (set before the first await)
        return new ValueTask(_stopping);
    }

    async Task StopOnceAsync()
    {
        _draining = true;
        if (_app != null)
        {
            var deadline = Stopwatch.StartNew();
            while (Volatile.Read(ref _inFlight) > 0 && deadline.Elapsed < _o.DrainTimeout) await Task.Delay(20);
            var left = _o.DrainTimeout - deadline.Elapsed;
            using var cut = new CancellationTokenSource(left > TimeSpan.Zero ? left : TimeSpan.Zero);
            await _app.StopAsync(cut.Token);
            await _app.DisposeAsync();
        }
        _engine.Dispose();
        _models?.Dispose();
    }
}
