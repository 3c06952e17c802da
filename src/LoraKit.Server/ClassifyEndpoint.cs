using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Data;
using LoraKit.Lora;
using LoraKit.Serving;
using LoraKit.Training;
using Microsoft.AspNetCore.Http;
using static TorchSharp.torch;

namespace LoraKit.Server;

/// <summary>
/// <c>POST /v1/classify</c> (a LoraKit extension; a user route, keys enforced like the others):
/// <c>{"model": adapter, "input": "text" | ["text", …]}</c> → <c>{"object": "list", "data": [{"index", "label",
/// "probabilities": {label: p}}], "model", "usage"}</c>. The adapter must be a sequence-classification adapter; its LoRA
/// part is loaded through the registry like any adapter, its score head and labels are read per request. The forward
/// runs on the engine thread between decode steps, a few texts at a time, each in its own dispose scope.
/// </summary>
public sealed class ClassifyEndpoint(InferenceEngine engine, AdapterRegistry registry, ServerOptions o, string baseName, OpenAiServer.BodyGate bodies)
{
    /// <summary>Texts per request at most, and per forward pass on the engine thread.</summary>
    public const int MaxInputs = 256, BatchPerStep = 8;

    int _inFlight;

    sealed class Refused(int status, string message, string param) : Exception(message)
    {
        public int Status { get; } = status;
        public string Param { get; } = param;
    }

    /// <summary>
    /// The 400 message for using <paramref name="adapter"/> to generate when it is a classification adapter, else null
    /// (unknown or broken adapters are left to the generation path, which reports them).
    /// </summary>
    public static string? RefuseGeneration(AdapterRegistry registry, string adapter)
    {
        try
        {
            var task = AdapterFiles.Task(registry.Resolve(adapter));
            return task.IsSequenceClassification
                ? $"adapter '{adapter}' is a sequence-classification adapter (labels: {task.LabelList}); use POST /v1/classify"
                : null;
        }
        catch (Exception e) when (e is LoraKitException or IOException or KeyNotFoundException or InvalidDataException or UnauthorizedAccessException) { return null; }
    }

    public async Task Handle(HttpContext c)
    {
        // The body first, outside the queue (see OpenAiServer.Complete: slow bodies must not hold places).
        (string name, List<string> texts) request;
        if (!bodies.TryEnter()) { await Write(c, 429, new Refused(429, OpenAiServer.BodyGate.Busy, "body"), "rate_limit_error"); return; }
        try { request = await ParseAsync(c); }
        catch (Refused e) { await Write(c, e.Status, e, "invalid_request_error"); return; }
        finally { bodies.Exit(); }
        if (Interlocked.Increment(ref _inFlight) > o.MaxConcurrent + o.MaxQueued)
        {
            Interlocked.Decrement(ref _inFlight);
            await Write(c, 429, new Refused(429, "too many requests in flight; retry later", "model"), "rate_limit_error");
            return;
        }
        try
        {
            var (name, texts) = request;
            if (name == "base" || name == baseName)
                throw new Refused(400, $"'{name}' is the base model, which has no classification head; name a sequence-classification adapter", "model");
            var (labels, score) = ReadHead(name);
            using (score)
            {
                var ids = texts.Select((t, i) => Encode(t, i, texts.Count > 1)).ToList();
                using var lease = await Acquire(name);
                var data = new List<object>(texts.Count);
                for (int i = 0; i < ids.Count; i += BatchPerStep)
                {
                    var rows = ids.Skip(i).Take(BatchPerStep).ToList();
                    var logits = await engine.RunAsync(lm => Forward(lm, name, rows, score));
                    for (int r = 0; r < rows.Count; r++)
                    {
                        var l = logits[r];
                        double max = l.Max(), sum = l.Sum(x => Math.Exp(x - max));
                        var probabilities = new Dictionary<string, double>();
                        for (int k = 0; k < labels.Count; k++) probabilities[labels[k]] = Math.Exp(l[k] - max) / sum;
                        data.Add(new { index = i + r, label = labels[Array.IndexOf(l, l.Max())], probabilities });
                    }
                }
                int tokens = ids.Sum(x => x.Length);
                await c.Response.WriteAsJsonAsync(new { @object = "list", data, model = name, usage = new { prompt_tokens = tokens, total_tokens = tokens } });
            }
        }
        catch (Refused e) { await Write(c, e.Status, e, e.Status == 429 ? "rate_limit_error" : "invalid_request_error"); }
        catch (OperationCanceledException) when (c.RequestAborted.IsCancellationRequested) { }
        finally { Interlocked.Decrement(ref _inFlight); }
    }

    async Task<(string name, List<string> texts)> ParseAsync(HttpContext c)
    {
        JsonObject body;
        using var deadline = bodies.Deadline(c.RequestAborted);
        try { body = await JsonNode.ParseAsync(c.Request.Body, cancellationToken: deadline.Token) as JsonObject ?? throw new Refused(400, "the body must be a JSON object", "body"); }
        catch (JsonException e) { throw new Refused(400, $"invalid JSON: {LoraKit.IO.JsonFiles.Reason(e)}", "body"); }
        catch (BadHttpRequestException e) when (e.StatusCode == 413) { throw new Refused(413, $"request body exceeds {o.MaxBodyBytes} bytes", "body"); }
        catch (OperationCanceledException) when (!c.RequestAborted.IsCancellationRequested) { throw new Refused(408, bodies.TooSlow, "body"); }
        catch (BadHttpRequestException e) { throw new Refused(e.StatusCode, OpenAiServer.BodyFault(e), "body"); }
        catch (IOException) when (!c.RequestAborted.IsCancellationRequested) { throw new Refused(400, OpenAiServer.MalformedFraming, "body"); }
        string name = body["model"] switch
        {
            null => throw new Refused(400, "missing \"model\" (the classification adapter's name)", "model"),
            JsonValue v when Str(v) is string s && s.Length > 0 => s,
            _ => throw new Refused(400, "\"model\" must be a non-empty string (the classification adapter's name)", "model"),
        };
        if (name.Length > 128) throw new Refused(400, $"\"model\" is {name.Length} characters long; adapter names have at most 128", "model");
        var texts = body["input"] switch
        {
            null => throw new Refused(400, "missing \"input\" (a string or an array of strings)", "input"),
            JsonValue v when Str(v) is string s => [s],
            JsonArray { Count: 0 } => throw new Refused(400, "\"input\" is an empty array", "input"),
            JsonArray { Count: > MaxInputs } a => throw new Refused(400, $"\"input\" has {a.Count} texts; at most {MaxInputs} per request", "input"),
            JsonArray a => a.Select((x, i) => x is JsonValue xv && Str(xv) is string s ? s
                : throw new Refused(400, $"\"input\"[{i}] must be a string", "input")).ToList(),
            _ => throw new Refused(400, "\"input\" must be a string or an array of strings", "input"),
        };
        return (name, texts);
    }

    /// <summary>A JSON string's value, null for other kinds; a lone surrogate escape is a 400.</summary>
    static string? Str(JsonValue v)
    {
        try { return v.TryGetValue<string>(out var s) ? s : null; }
        catch (InvalidOperationException) { throw new Refused(400, "a string in the body is not valid Unicode (a lone surrogate escape)", "body"); }
    }

    (IReadOnlyList<string> labels, Tensor score) ReadHead(string name)
    {
        string dir;
        try { dir = registry.Resolve(name); }
        catch (AdapterNameException e) { throw new Refused(400, e.Message, "model"); }
        catch (KeyNotFoundException e) { throw new Refused(404, $"{e.Message} (see /v1/models)", "model"); }
        // labels.json follows the registry's containment rule for adapter files: no link leading outside the root.
        if (o.Adapters is null) throw new Refused(404, $"no adapter named '{name}' (this server has no adapters directory)", "model");
        var root = Path.GetFullPath(o.Adapters) + Path.DirectorySeparatorChar;
        var labels = new FileInfo(Path.Combine(dir, AdapterFiles.LabelsFile));
        if (labels.Exists && labels.ResolveLinkTarget(true) is { } target && !Path.GetFullPath(target.FullName).StartsWith(root, StringComparison.Ordinal))
            throw new Refused(400, $"adapter '{name}' has a file that links outside the adapters directory", "model");
        try { return SequenceClassifier.ReadHead(dir, engine.Model.Config.HiddenSize); }
        catch (AdapterTaskException)
        {
            throw new Refused(400, $"adapter '{name}' is not a sequence-classification adapter (no score head and labels); use /v1/chat/completions or /v1/completions", "model");
        }
        catch (Exception e) when (e is LoraKitException or InvalidDataException or IOException or UnauthorizedAccessException)
        {
            throw new Refused(422, $"adapter '{name}' cannot be used: {Hide(e.Message, dir, name)}", "model");
        }
    }

    async Task<IDisposable> Acquire(string name)
    {
        try { return await registry.AcquireAsync(name); }
        catch (AdapterNameException e) { throw new Refused(400, e.Message, "model"); }
        catch (KeyNotFoundException e) { throw new Refused(404, $"{e.Message} (see /v1/models)", "model"); }
        catch (InvalidOperationException e) { throw new Refused(429, e.Message, "model"); }
        catch (Exception e) when (e is LoraKitException or InvalidDataException or IOException)
        {
            throw new Refused(422, $"adapter '{name}' cannot be used with this base model: {Hide(e.Message, registry.Resolve(name), name)}", "model");
        }
    }

    /// <summary>Error messages name the adapter, never the server's paths.</summary>
    static string Hide(string message, string dir, string name) => message.Replace(dir, $"adapter '{name}'", StringComparison.Ordinal);

    int[] Encode(string text, int i, bool many)
    {
        string where = many ? $"\"input\"[{i}]" : "\"input\"";
        if (text.Length == 0) throw new Refused(400, $"{where} is empty", "input");
        int limit = Math.Min(o.MaxPromptTokens, engine.Model.Config.MaxPositionEmbeddings);
        if ((long)text.Length > 1024L * limit) throw new Refused(400, $"{where} has {text.Length} characters, far past the limit of {limit} tokens", "input");
        var ids = engine.Tokenizer.Encode(text);
        if (ids.Length == 0) throw new Refused(400, $"{where} encodes to no tokens", "input");
        if (ids.Length > limit) throw new Refused(400, $"{where} has {ids.Length} tokens; the limit is {limit}", "input");
        return ids;
    }

    /// <summary>Class logits of a few texts with the adapter (engine thread): eval mode, no gradients, one scope.</summary>
    float[][] Forward(LoraModel lm, string name, List<int[]> rows, Tensor score)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        lm.Model.eval();
        if (!lm.Configs.ContainsKey(name)) throw new KeyNotFoundException($"adapter '{name}' is not loaded");
        lm.SetRowAdapters(Enumerable.Repeat<string?>(name, rows.Count).ToArray());
        int? pad = SequenceClassifier.PadFor(engine.Tokenizer, lm.Model.Config);
        using var batch = Batches.Collate(rows.Select(x => new Sample(x, x, 0)).ToList(), pad ?? 0, lm.Model.Device);
        var h = lm.Model.model.Forward(batch.InputIds, batch.AttentionMask, null);
        var pooled = SequenceClassifier.Pool(h, batch.InputIds, batch.AttentionMask, pad).to(ScalarType.Float32);
        var logits = nn.functional.linear(pooled, score.to(lm.Model.Device)).cpu();
        return Enumerable.Range(0, rows.Count).Select(r => logits[r].data<float>().ToArray()).ToArray();
    }

    static Task Write(HttpContext c, int status, Refused e, string type)
    {
        c.Response.StatusCode = status;
        // Names echoed from the request may hold control characters: escape them, so a message stays one line.
        var message = System.Text.RegularExpressions.Regex.Replace(e.Message, @"\p{C}", m => $"\\u{(int)m.Value[0]:x4}");
        return c.Response.WriteAsJsonAsync(new { error = new { message, type, param = e.Param, code = (string?)null } });
    }
}
