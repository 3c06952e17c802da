namespace LoraKit.Serving;

/// <summary>
/// Operations metrics of one serving engine, rendered in Prometheus' text exposition format 0.0.4 (the server's
/// <c>GET /metrics</c>). The engine reports what happens (a request queued, admitted, its first token, tokens, the end and
/// its reason, each step's batch); these methods are thread-safe and cheap enough for the engine thread's every step.
/// Every metric is named <c>lorakit_*</c>; histograms use vLLM's bucket edges for time to first token and time per output
/// token, so dashboards built for vLLM read these with a prefix change.
/// <para>
/// Each engine owns its metrics (no process-wide registry): two servers in one process, as in tests, count apart.
/// Labels take only fixed sets of values (finish reasons, cache outcomes, tiers), never adapter names: every distinct
/// label value is a series Prometheus keeps, and thousands of adapters (or a client inventing names) would be unbounded.
/// </para>
/// <para>
/// The renderer is LoraKit's own (<c>PrometheusText.cs</c>, ~150 lines) rather than prometheus-net: this type lives in the
/// core library, which in-process users (training, <see cref="LoraKitChatClient"/>) load without any HTTP; prometheus-net
/// is built around a static default registry, attaches exemplars from <c>Activity.Current</c> on every observation and
/// brings Microsoft.Extensions.Http into every consumer, for a format of four line shapes that a strict parser in the
/// tests checks.
/// </para>
/// </summary>
public sealed class ServingMetrics
{
    /// <summary>Bucket upper bounds of <c>lorakit_time_to_first_token_seconds</c> (vLLM's, 1 ms to 80 s).</summary>
    public static IReadOnlyList<double> TimeToFirstTokenBuckets { get; } =
        [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

    /// <summary>Bucket upper bounds of <c>lorakit_time_per_output_token_seconds</c> (vLLM's, 10 ms to 80 s).</summary>
    public static IReadOnlyList<double> TimePerOutputTokenBuckets { get; } =
        [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

    /// <summary>Finish reasons <see cref="RequestFinished"/> takes (OpenAI's "stop" and "length", and the two ways a request ends without one).</summary>
    public static IReadOnlyList<string> FinishReasons { get; } = ["stop", "length", "cancelled", "error"];

    /// <summary>Outcomes <see cref="AdapterCache"/> takes: on the GPU already, in host memory, or loaded from storage.</summary>
    public static IReadOnlyList<string> AdapterCacheOutcomes { get; } = ["gpu_hit", "cpu_hit", "load"];

    /// <summary>Tiers <see cref="AdapterEvicted"/> takes.</summary>
    public static IReadOnlyList<string> AdapterTiers { get; } = ["gpu", "cpu"];

    static readonly double[] BatchBuckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];
    static readonly double[] StepTokenBuckets = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384];
    static readonly double[] StepSecondsBuckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    static readonly double[] LoadSecondsBuckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

    readonly CounterFamily _queued = new("lorakit_requests_queued_total", "Generation requests that entered the engine's queue.");
    readonly CounterFamily _admitted = new("lorakit_requests_admitted_total", "Generation requests the engine admitted into its running batch.");
    readonly CounterFamily _finished = new("lorakit_requests_total", "Generation requests finished, by reason (stop, length, cancelled, error).", "reason");
    readonly CounterFamily _promptTokens = new("lorakit_prompt_tokens_total", "Prompt tokens of admitted requests.");
    readonly CounterFamily _generationTokens = new("lorakit_generation_tokens_total", "Tokens generated (cancelled requests' tokens included).");
    readonly HistogramFamily _ttft = new("lorakit_time_to_first_token_seconds", "Seconds from a request's arrival at the engine to its first generated token.",
        [.. TimeToFirstTokenBuckets]);
    readonly HistogramFamily _tpot = new("lorakit_time_per_output_token_seconds",
        "Seconds between consecutive generated tokens of a request (one observation per token after the first).", [.. TimePerOutputTokenBuckets]);
    readonly CounterFamily _steps = new("lorakit_steps_total", "Engine steps (forward passes over the running batch).");
    readonly HistogramFamily _batch = new("lorakit_batch_size", "Requests (rows) per engine step.", BatchBuckets);
    readonly HistogramFamily _stepTokens = new("lorakit_step_tokens", "Tokens computed per engine step (prefill and decode).", StepTokenBuckets);
    readonly HistogramFamily _stepSeconds = new("lorakit_step_duration_seconds", "Seconds per engine step.", StepSecondsBuckets);
    readonly GaugeFamily _queue = new("lorakit_queue_length", "Generation requests waiting in the engine's queue.");
    readonly GaugeFamily _running = new("lorakit_running_requests", "Generation requests in the running batch.");
    readonly GaugeFamily _kvRatio = new("lorakit_kv_cache_usage_ratio", "Share of the KV cache's blocks in use (0 to 1).");
    readonly GaugeFamily _kvBlocks = new("lorakit_kv_cache_blocks", "KV cache blocks, by state (used, total).", "state");
    readonly CounterFamily _adapterCache = new("lorakit_adapter_cache_total", "Adapter lookups by outcome: on the GPU (gpu_hit), in host memory (cpu_hit), loaded from storage (load).", "outcome");
    readonly HistogramFamily _adapterLoad = new("lorakit_adapter_load_seconds", "Seconds to load an adapter from storage.", LoadSecondsBuckets);
    readonly CounterFamily _evictions = new("lorakit_adapter_evictions_total", "Adapters evicted, by tier (gpu, cpu).", "tier");
    readonly IMetricFamily[] _all;

    /// <summary>All metrics at zero; labelled ones have every allowed label value present, so rates start from 0.</summary>
    public ServingMetrics()
    {
        foreach (var r in FinishReasons) _ = _finished.Of(r);
        foreach (var o in AdapterCacheOutcomes) _ = _adapterCache.Of(o);
        foreach (var t in AdapterTiers) _ = _evictions.Of(t);
        _ = _kvBlocks.Of("used"); _ = _kvBlocks.Of("total");
        _all = [_queued, _admitted, _finished, _promptTokens, _generationTokens, _ttft, _tpot, _steps, _batch, _stepTokens, _stepSeconds,
                _queue, _running, _kvRatio, _kvBlocks, _adapterCache, _adapterLoad, _evictions];
        foreach (var c in new[] { _queued, _admitted, _promptTokens, _generationTokens, _steps }) _ = c.Of();
        foreach (var g in new[] { _queue, _running, _kvRatio }) _ = g.Of();
        foreach (var h in new[] { _ttft, _tpot, _batch, _stepTokens, _stepSeconds, _adapterLoad }) _ = h.Of();
    }

    /// <summary>A generation request entered the engine's queue.</summary>
    public void RequestQueued() => _queued.Of().Add(1);

    /// <summary>A request left the queue for the running batch.</summary>
    public void RequestAdmitted() => _admitted.Of().Add(1);

    /// <summary>Prompt tokens of an admitted request.</summary>
    public void PromptTokens(int n) => _promptTokens.Of().Add(NonNegative(n));

    /// <summary>A request's first generated token, <paramref name="secondsSinceArrival"/> after it entered the engine's queue.</summary>
    public void FirstToken(double secondsSinceArrival) => _ttft.Of().Observe(secondsSinceArrival);

    /// <summary>Tokens generated (by one step, or for one request); a cancelled request's tokens count too.</summary>
    public void OutputTokens(int n) => _generationTokens.Of().Add(NonNegative(n));

    /// <summary>
    /// The time between one generated token and the previous token of the same request: one observation per token after
    /// the first (so the histogram's count is <c>generation tokens - first tokens</c>), as vLLM's inter-token latency.
    /// </summary>
    public void TimePerOutputToken(double seconds) => _tpot.Of().Observe(seconds);

    /// <summary>A request ended: "stop" (EOS or a stop string), "length" (max_tokens or context), "cancelled" (client gone), or "error".</summary>
    /// <exception cref="ArgumentException">Any other reason (a defect of the caller: labels take fixed values only).</exception>
    public void RequestFinished(string reason) => _finished.Of(Known(reason, FinishReasons, nameof(reason))).Add(1);

    /// <summary>One engine step over <paramref name="batchRows"/> requests computing <paramref name="tokens"/> tokens, in <paramref name="seconds"/>.</summary>
    public void Step(int batchRows, int tokens, double seconds)
    {
        _steps.Of().Add(1);
        _batch.Of().Observe(NonNegative(batchRows));
        _stepTokens.Of().Observe(NonNegative(tokens));
        _stepSeconds.Of().Observe(seconds);
    }

    /// <summary>Requests waiting in the engine's queue now.</summary>
    public void SetQueueLength(int n) => _queue.Of().Set(NonNegative(n));

    /// <summary>Requests in the running batch now.</summary>
    public void SetRunning(int n) => _running.Of().Set(NonNegative(n));

    /// <summary>KV cache blocks in use and in all; the usage ratio follows (0 while there is no cache).</summary>
    public void SetKvCache(long usedBlocks, long totalBlocks)
    {
        if (usedBlocks < 0 || totalBlocks < 0 || usedBlocks > totalBlocks)
            throw new ArgumentOutOfRangeException(nameof(usedBlocks), $"used {usedBlocks} of {totalBlocks} KV cache blocks");
        _kvBlocks.Of("used").Set(usedBlocks);
        _kvBlocks.Of("total").Set(totalBlocks);
        _kvRatio.Of().Set(totalBlocks == 0 ? 0 : (double)usedBlocks / totalBlocks);
    }

    /// <summary>An adapter lookup: "gpu_hit", "cpu_hit" or "load".</summary>
    /// <exception cref="ArgumentException">Any other outcome.</exception>
    public void AdapterCache(string outcome) => _adapterCache.Of(Known(outcome, AdapterCacheOutcomes, nameof(outcome))).Add(1);

    /// <summary>Seconds one adapter load from storage took.</summary>
    public void AdapterLoadSeconds(double s) => _adapterLoad.Of().Observe(s);

    /// <summary>An adapter evicted from the "gpu" or "cpu" tier.</summary>
    /// <exception cref="ArgumentException">Any other tier.</exception>
    public void AdapterEvicted(string tier) => _evictions.Of(Known(tier, AdapterTiers, nameof(tier))).Add(1);

    /// <summary>Writes every metric in the text exposition format 0.0.4 (lines end in "\n").</summary>
    public void Write(TextWriter w)
    {
        foreach (var f in _all) f.Write(w);
    }

    /// <summary>The text <see cref="Write"/> writes.</summary>
    public string Render()
    {
        var w = new StringWriter(System.Globalization.CultureInfo.InvariantCulture);
        Write(w);
        return w.ToString();
    }

    static string Known(string value, IReadOnlyList<string> allowed, string what) =>
        allowed.Contains(value) ? value : throw new ArgumentException($"{what} must be one of {string.Join(", ", allowed)}, not '{value}'", what);

    static int NonNegative(int n) => n >= 0 ? n : throw new ArgumentOutOfRangeException(nameof(n), n, "must be ≥ 0");
}
