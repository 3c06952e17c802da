using LoraKit.Serving;

namespace LoraKit.Server;

/// <summary>
/// The server's own metrics beside the engine's <see cref="ServingMetrics"/> in <c>GET /metrics</c>: HTTP requests by
/// endpoint and status, requests turned away (429 rate limits, 503 while draining), requests in flight. The endpoint
/// label is the matched route's pattern (e.g. <c>/admin/adapters/{name}/load</c>), or "unmatched": never the raw path,
/// which a client chooses, so the number of series stays bounded whatever is sent.
/// </summary>
internal sealed class HttpMetrics
{
    /// <summary>Reasons <see cref="Rejected"/> takes: "rate_limited" (429: queue, body gate or adapter slots full), "draining" (503 while stopping).</summary>
    public static IReadOnlyList<string> RejectReasons { get; } = ["rate_limited", "draining"];

    readonly CounterFamily _requests = new("lorakit_http_requests_total", "HTTP requests answered, by route pattern and status code (499: the client went away first).", "path", "status");
    readonly CounterFamily _rejected = new("lorakit_http_requests_rejected_total", "HTTP requests turned away: rate_limited (429) or draining (503 while the server stops).", "reason");
    readonly GaugeFamily _inFlight = new("lorakit_http_requests_in_flight", "HTTP requests being handled now.");
    readonly GaugeFamily _draining = new("lorakit_draining", "1 while the server drains before stopping (/health answers 503), else 0.");
    readonly IMetricFamily[] _all;

    /// <summary>All counts at zero.</summary>
    public HttpMetrics()
    {
        foreach (var r in RejectReasons) _ = _rejected.Of(r);
        _ = _inFlight.Of();
        _ = _draining.Of();
        _all = [_requests, _rejected, _inFlight, _draining];
    }

    /// <summary>One request answered on <paramref name="path"/> (a route pattern or "unmatched") with <paramref name="status"/>.</summary>
    public void Request(string path, int status) => _requests.Of(path, status.ToString(System.Globalization.CultureInfo.InvariantCulture)).Add(1);

    /// <summary>A request turned away for one of <see cref="RejectReasons"/>.</summary>
    public void Rejected(string reason) =>
        _rejected.Of(RejectReasons.Contains(reason) ? reason : throw new ArgumentException($"reason must be one of {string.Join(", ", RejectReasons)}, not '{reason}'", nameof(reason))).Add(1);

    /// <summary>Requests being handled now.</summary>
    public void SetInFlight(int n) => _inFlight.Of().Set(n);

    /// <summary>Whether the server is draining.</summary>
    public void SetDraining(bool draining) => _draining.Of().Set(draining ? 1 : 0);

    /// <summary>Writes these metrics in the text exposition format 0.0.4.</summary>
    public void Write(TextWriter w)
    {
        foreach (var f in _all) f.Write(w);
    }
}
