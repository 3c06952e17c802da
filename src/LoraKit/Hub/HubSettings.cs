namespace LoraKit.Hub;

/// <summary>
/// Where and how LoraKit talks to the Hugging Face hub, read from the same environment variables as
/// <c>huggingface_hub</c> so both tools share one cache and one login: <c>HF_HUB_CACHE</c> (default <c>$HF_HOME/hub</c>,
/// <c>HF_HOME</c> defaulting to <c>$XDG_CACHE_HOME/huggingface</c>, else <c>~/.cache/huggingface</c>), <c>HF_ENDPOINT</c>
/// (default https://huggingface.co), <c>HF_TOKEN</c> (else the token file <c>huggingface-cli login</c> writes,
/// <c>$HF_HOME/token</c>) and <c>HF_HUB_OFFLINE</c> (1/true/yes/on: the cache only, no network).
/// </summary>
public sealed record HubSettings
{
    /// <summary>The default endpoint.</summary>
    public const string DefaultEndpoint = "https://huggingface.co";

    /// <summary>The hub cache folder (holds <c>models--ORG--NAME</c> folders).</summary>
    public required string CacheDir { get; init; }
    /// <summary>The hub's base URL, without a trailing slash.</summary>
    public string Endpoint { get; init; } = DefaultEndpoint;
    /// <summary>The access token sent as <c>Authorization: Bearer</c> to the endpoint (never to a redirect's other host), or null.</summary>
    public string? Token { get; init; }
    /// <summary>Read the cache only; a file that is not there is an error rather than a download.</summary>
    public bool Offline { get; init; }
    /// <summary>Receives download progress (null: none).</summary>
    public IProgress<HubProgress>? Progress { get; init; }
    /// <summary>The largest file LoraKit accepts from the hub (a bound against a hostile or broken server).</summary>
    public long MaxFileBytes { get; init; } = 1L << 40;

    /// <summary>The settings the environment gives.</summary>
    public static HubSettings FromEnvironment()
    {
        string? Env(string name) => Environment.GetEnvironmentVariable(name) is { Length: > 0 } v ? v : null;
        string home = Env("HF_HOME") ?? Path.Combine(Env("XDG_CACHE_HOME")
            ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache"), "huggingface");
        string tokenFile = Env("HF_TOKEN_PATH") ?? Path.Combine(home, "token");
        return new HubSettings
        {
            CacheDir = Env("HF_HUB_CACHE") ?? Env("HUGGINGFACE_HUB_CACHE") ?? Path.Combine(home, "hub"),
            Endpoint = (Env("HF_ENDPOINT") ?? DefaultEndpoint).TrimEnd('/'),
            Token = Env("HF_TOKEN") ?? Env("HUGGING_FACE_HUB_TOKEN") ?? ReadToken(tokenFile),
            Offline = IsTrue(Env("HF_HUB_OFFLINE")),
        };
    }

    /// <summary>True for the values <c>huggingface_hub</c> reads as true.</summary>
    static bool IsTrue(string? value) => value?.Trim().ToUpperInvariant() is "1" or "ON" or "YES" or "TRUE";

    static string? ReadToken(string path)
    {
        try { return File.Exists(path) && new FileInfo(path).Length < 4096 && File.ReadAllText(path).Trim() is { Length: > 0 } t ? t : null; }
        catch (IOException) { return null; }
        catch (UnauthorizedAccessException) { return null; }
    }
}
