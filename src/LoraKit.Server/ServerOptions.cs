namespace LoraKit.Server;

/// <summary>
/// Settings of <see cref="OpenAiServer.StartAsync"/> (and so of <c>lorakit serve</c>, whose flags set them); every limit
/// is enforced with a clear 4xx error.
/// </summary>
public sealed record ServerOptions
{
    /// <summary>Base model directory (Hugging Face layout: config.json, safetensors, tokenizer.json).</summary>
    public required string Model { get; init; }
    /// <summary>Directory whose subdirectories are PEFT adapters, addressed by their names (null: none; then <see cref="Registry"/> is required).</summary>
    public string? Adapters { get; init; }
    /// <summary>
    /// Adapter registry folder (holding registry.db) to serve <c>NAME@VERSION</c> / <c>NAME@ALIAS</c> / <c>NAME</c> from
    /// (see <see cref="RegistryModels"/>); null: none. It must exist: a server never creates a registry.
    /// </summary>
    public string? Registry { get; init; }
    /// <summary>Interface to listen on.</summary>
    public string Host { get; init; } = "127.0.0.1";
    /// <summary>TCP port (0 = any free port; <see cref="OpenAiServer.Url"/> tells which).</summary>
    public int Port { get; init; } = 8000;
    /// <summary>Bearer key for the /v1 endpoints; null = none (see <see cref="Insecure"/>).</summary>
    public string? ApiKey { get; init; }
    /// <summary>Bearer key for the /admin endpoints (it also works on /v1); null = admin endpoints open only without any key.</summary>
    public string? AdminKey { get; init; }
    /// <summary>auto, cpu or cuda (see <see cref="LoraKit.Runtime.Placement"/>).</summary>
    public string Device { get; init; } = "auto";
    /// <summary>fp32, bf16 or fp16; null = the device's default.</summary>
    public string? Dtype { get; init; }
    /// <summary>Quantize the base's linear layers on load and keep them packed (null: as stored; a pre-quantized checkpoint loads packed).</summary>
    public LoraKit.Quantization.BnbQuantizeOptions? Quantize { get; init; }
    /// <summary>Name the base model is listed and addressed by (besides "base"); default: the model directory's name.</summary>
    public string? ModelName { get; init; }
    /// <summary>Adapters kept loaded at once (least recently used evicted).</summary>
    public int MaxLoadedAdapters { get; init; } = 8;
    /// <summary>Sequences decoded together.</summary>
    public int MaxBatch { get; init; } = 16;
    /// <summary>Adapters kept read and validated in host memory beyond those on the device (least recently used dropped).</summary>
    public int MaxHostAdapters { get; init; } = 32;
    /// <summary>KV cache: a fraction of free device memory (≤ 1) or GiB (see <see cref="LoraKit.Serving.EngineOptions.KvCacheMemory"/>).</summary>
    public double KvCacheMemory { get; init; } = 0.9;
    /// <summary>Tokens one engine step computes at most (decode tokens plus prefill chunks).</summary>
    public int MaxTokensPerStep { get; init; } = 2048;
    /// <summary>Decode steps as CUDA graphs where possible.</summary>
    public bool CudaGraphs { get; init; } = true;
    /// <summary>Largest request body (else 413).</summary>
    public long MaxBodyBytes { get; init; } = 1 << 20;
    /// <summary>Longest prompt accepted, in tokens.</summary>
    public int MaxPromptTokens { get; init; } = 4096;
    /// <summary>Largest max_tokens a request may ask for.</summary>
    public int MaxTokens { get; init; } = 1024;
    /// <summary>Most stop strings per request.</summary>
    public int MaxStopStrings { get; init; } = 4;
    /// <summary>Requests generating at once; more wait in a queue of <see cref="MaxQueued"/>, beyond that 429.</summary>
    public int MaxConcurrent { get; init; } = 32;
    /// <summary>Requests waiting for a generation slot at most (beyond that 429).</summary>
    public int MaxQueued { get; init; } = 64;
    /// <summary>
    /// A request body must arrive within this time (else 408); at most 4 × (<see cref="MaxConcurrent"/> +
    /// <see cref="MaxQueued"/>) bodies arrive at once (else 429). Bodies are read before a request takes a queue place,
    /// so these two bound what slow or stalled senders can hold: time, and memory (that many × <see cref="MaxBodyBytes"/>).
    /// </summary>
    public TimeSpan BodyTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Serve adapters LoraKit recorded as trained on another base model anyway (otherwise 422).</summary>
    public bool AllowBaseMismatch { get; init; }
    /// <summary>On stop, how long in-flight requests may still run before their connections are closed.</summary>
    public TimeSpan DrainTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>
    /// Serve <c>GET /metrics</c> without a key even when keys are set (for a Prometheus scraper inside a trusted network);
    /// otherwise it takes the API key or the admin key, as /v1 does. It shows request counts and timings, no prompts.
    /// </summary>
    public bool MetricsPublic { get; init; }
    /// <summary>Allow listening on a non-loopback address with no key (refused otherwise).</summary>
    public bool Insecure { get; init; }
    /// <summary>Receives one line per request (method, route, model, status, tokens, ms) and server errors; null = silent.</summary>
    public Action<string>? Log { get; init; }

    /// <summary>Whether <see cref="Host"/> names only this machine (localhost, 127.0.0.0/8, ::1).</summary>
    public bool IsLoopback => Host.Equals("localhost", StringComparison.OrdinalIgnoreCase)
        || (System.Net.IPAddress.TryParse(Host.Trim('[', ']'), out var ip) && System.Net.IPAddress.IsLoopback(ip));
}
