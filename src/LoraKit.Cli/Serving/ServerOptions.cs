namespace LoraKit.Cli.Serving;

/// <summary>Settings of <c>lorakit serve</c>; every limit is enforced with a clear 4xx error.</summary>
public sealed record ServerOptions
{
    public required string Model { get; init; }
    public required string Adapters { get; init; }
    public string Host { get; init; } = "127.0.0.1";
    public int Port { get; init; } = 8000;
    public string? ApiKey { get; init; }
    public string? AdminKey { get; init; }
    public string Device { get; init; } = "auto";
    public string? Dtype { get; init; }
    /// <summary>Name the base model is listed and addressed by (besides "base"); default: the model directory's name.</summary>
    public string? ModelName { get; init; }
    public int MaxLoadedAdapters { get; init; } = 8;
    public int MaxBatch { get; init; } = 16;
    public long MaxBodyBytes { get; init; } = 1 << 20;
    public int MaxPromptTokens { get; init; } = 4096;
    public int MaxTokens { get; init; } = 1024;
    public int MaxStopStrings { get; init; } = 4;
    /// <summary>Requests generating at once; more wait in a queue of <see cref="MaxQueued"/>, beyond that 429.</summary>
    public int MaxConcurrent { get; init; } = 32;
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
    /// <summary>Allow listening on a non-loopback address with no key (refused otherwise).</summary>
    public bool Insecure { get; init; }
    /// <summary>Receives one line per request (method, route, model, status, tokens, ms) and server errors; null = silent.</summary>
    public Action<string>? Log { get; init; }

    /// <summary>Whether <see cref="Host"/> names only this machine (localhost, 127.0.0.0/8, ::1).</summary>
    public bool IsLoopback => Host.Equals("localhost", StringComparison.OrdinalIgnoreCase)
        || (System.Net.IPAddress.TryParse(Host.Trim('[', ']'), out var ip) && System.Net.IPAddress.IsLoopback(ip));
}
