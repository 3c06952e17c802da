using System.Globalization;
using LoraKit.Serving;

namespace LoraKit.Tests;

/// <summary>ServingMetrics and its Prometheus text renderer, without a server: bucket edges, escaping, counts, threads.</summary>
public class ServingMetricsTests
{
    [Fact]
    public void AFreshEngineRendersEveryFamilyAtZeroAndParsesStrictly()
    {
        var m = PrometheusParser.Parse(new ServingMetrics().Render());
        foreach (var (name, type) in new[]
        {
            ("lorakit_requests_total", "counter"), ("lorakit_requests_queued_total", "counter"), ("lorakit_requests_admitted_total", "counter"),
            ("lorakit_prompt_tokens_total", "counter"), ("lorakit_generation_tokens_total", "counter"), ("lorakit_steps_total", "counter"),
            ("lorakit_time_to_first_token_seconds", "histogram"), ("lorakit_time_per_output_token_seconds", "histogram"),
            ("lorakit_batch_size", "histogram"), ("lorakit_step_tokens", "histogram"), ("lorakit_step_duration_seconds", "histogram"),
            ("lorakit_queue_length", "gauge"), ("lorakit_running_requests", "gauge"), ("lorakit_kv_cache_usage_ratio", "gauge"),
            ("lorakit_kv_cache_blocks", "gauge"), ("lorakit_adapter_cache_total", "counter"), ("lorakit_adapter_load_seconds", "histogram"),
            ("lorakit_adapter_evictions_total", "counter"),
        })
            Assert.Equal(type, m.TypeOf(name));
        foreach (var reason in ServingMetrics.FinishReasons) Assert.Equal(0, m.Value("lorakit_requests_total", $"reason={reason}"));
        foreach (var outcome in ServingMetrics.AdapterCacheOutcomes) Assert.Equal(0, m.Value("lorakit_adapter_cache_total", $"outcome={outcome}"));
        Assert.Equal(0, m.Value("lorakit_time_to_first_token_seconds_bucket", "le=+Inf"));
        Assert.All(m.Families.Keys, k => Assert.StartsWith("lorakit_", k));
    }

    [Fact]
    public void HistogramBucketsIncludeTheirUpperEdgeAndAreCumulative()
    {
        var s = new ServingMetrics();
        var edges = ServingMetrics.TimeToFirstTokenBuckets;
        s.FirstToken(edges[0]);                            // on the first edge: in le=edges[0]
        s.FirstToken(Math.BitIncrement(edges[0]));         // just above: in the next bucket only
        s.FirstToken(edges[^1]);                           // the last finite edge
        s.FirstToken(edges[^1] * 10);                      // beyond every edge: +Inf only
        s.FirstToken(double.NaN);                          // dropped: it would poison _sum
        var m = PrometheusParser.Parse(s.Render());
        string Le(double e) => "le=" + e.ToString("R", CultureInfo.InvariantCulture);
        Assert.Equal(1, m.Value("lorakit_time_to_first_token_seconds_bucket", Le(edges[0])));
        Assert.Equal(2, m.Value("lorakit_time_to_first_token_seconds_bucket", Le(edges[1])));
        Assert.Equal(2, m.Value("lorakit_time_to_first_token_seconds_bucket", Le(edges[^2])));
        Assert.Equal(3, m.Value("lorakit_time_to_first_token_seconds_bucket", Le(edges[^1])));
        Assert.Equal(4, m.Value("lorakit_time_to_first_token_seconds_bucket", "le=+Inf"));
        Assert.Equal(4, m.Value("lorakit_time_to_first_token_seconds_count"));
        Assert.Equal(edges[0] + Math.BitIncrement(edges[0]) + edges[^1] + edges[^1] * 10, m.Value("lorakit_time_to_first_token_seconds_sum"), 12);
        // The edges are vLLM's: 1 ms to 80 s for TTFT, 10 ms to 80 s per output token; "le" is written as they read.
        Assert.Equal((0.001, 80.0), (edges[0], edges[^1]));
        Assert.Equal((0.01, 80.0), (ServingMetrics.TimePerOutputTokenBuckets[0], ServingMetrics.TimePerOutputTokenBuckets[^1]));
        Assert.Contains("lorakit_time_to_first_token_seconds_bucket{le=\"0.001\"} 1\n", s.Render());
        Assert.Contains("lorakit_time_to_first_token_seconds_bucket{le=\"80\"} 3\n", s.Render());
    }

    [Fact]
    public void CallsCountWhereTheirNamesSay()
    {
        var s = new ServingMetrics();
        s.RequestQueued(); s.RequestQueued(); s.RequestAdmitted();
        s.PromptTokens(7); s.PromptTokens(5);
        s.OutputTokens(3);
        s.TimePerOutputToken(0.02); s.TimePerOutputToken(0.02);
        s.RequestFinished("stop"); s.RequestFinished("length"); s.RequestFinished("length"); s.RequestFinished("cancelled");
        s.Step(3, 40, 0.004); s.Step(16, 16, 0.5);
        s.SetQueueLength(4); s.SetRunning(3);
        s.SetKvCache(25, 100);
        s.AdapterCache("gpu_hit"); s.AdapterCache("load"); s.AdapterCache("load");
        s.AdapterLoadSeconds(0.2);
        s.AdapterEvicted("cpu");
        var m = PrometheusParser.Parse(s.Render());
        Assert.Equal(2, m.Value("lorakit_requests_queued_total"));
        Assert.Equal(1, m.Value("lorakit_requests_admitted_total"));
        Assert.Equal(12, m.Value("lorakit_prompt_tokens_total"));
        Assert.Equal(3, m.Value("lorakit_generation_tokens_total"));
        Assert.Equal(2, m.Value("lorakit_time_per_output_token_seconds_count"));
        Assert.Equal(2, m.Value("lorakit_time_per_output_token_seconds_bucket", "le=0.025"));
        Assert.Equal(0, m.Value("lorakit_time_per_output_token_seconds_bucket", "le=0.01"));
        Assert.Equal((1, 2, 1, 0), (m.Value("lorakit_requests_total", "reason=stop"), m.Value("lorakit_requests_total", "reason=length"),
            m.Value("lorakit_requests_total", "reason=cancelled"), m.Value("lorakit_requests_total", "reason=error")));
        Assert.Equal(2, m.Value("lorakit_steps_total"));
        Assert.Equal(2, m.Value("lorakit_batch_size_count"));
        Assert.Equal(19, m.Value("lorakit_batch_size_sum"));
        Assert.Equal(1, m.Value("lorakit_batch_size_bucket", "le=4"));
        Assert.Equal(56, m.Value("lorakit_step_tokens_sum"));
        Assert.Equal(1, m.Value("lorakit_step_duration_seconds_bucket", "le=0.005"));
        Assert.Equal((4, 3), (m.Value("lorakit_queue_length"), m.Value("lorakit_running_requests")));
        Assert.Equal((0.25, 25, 100), (m.Value("lorakit_kv_cache_usage_ratio"), m.Value("lorakit_kv_cache_blocks", "state=used"), m.Value("lorakit_kv_cache_blocks", "state=total")));
        Assert.Equal((1, 0, 2), (m.Value("lorakit_adapter_cache_total", "outcome=gpu_hit"), m.Value("lorakit_adapter_cache_total", "outcome=cpu_hit"), m.Value("lorakit_adapter_cache_total", "outcome=load")));
        Assert.Equal(1, m.Value("lorakit_adapter_load_seconds_count"));
        Assert.Equal((0, 1), (m.Value("lorakit_adapter_evictions_total", "tier=gpu"), m.Value("lorakit_adapter_evictions_total", "tier=cpu")));
    }

    [Fact]
    public void LabelsTakeOnlyTheirFixedValues()
    {
        // No label by adapter name or any other open set: each value is a series Prometheus keeps forever.
        var s = new ServingMetrics();
        Assert.Throws<ArgumentException>(() => s.RequestFinished("my-adapter"));
        Assert.Throws<ArgumentException>(() => s.AdapterCache("hit"));
        Assert.Throws<ArgumentException>(() => s.AdapterEvicted("disk"));
        Assert.Throws<ArgumentOutOfRangeException>(() => s.OutputTokens(-1));
        Assert.Throws<ArgumentOutOfRangeException>(() => s.SetKvCache(5, 4));
        Assert.DoesNotContain("my-adapter", s.Render());
    }

    [Fact]
    public void LabelValuesAndHelpAreEscapedAndReadBack()
    {
        var family = new CounterFamily("lorakit_test_total", "help with \\ a backslash\nand a newline", "path");
        string nasty = "a\"b\\c\nd}e,f=\"g";
        family.Of(nasty).Add(2);
        family.Of("plain").Add(1);
        var w = new StringWriter();
        family.Write(w);
        var text = w.ToString();
        Assert.Contains("{path=\"a\\\"b\\\\c\\nd}e,f=\\\"g\"} 2\n", text);
        var m = PrometheusParser.Parse(text);
        Assert.Equal(2, m.Value("lorakit_test_total", "path=" + nasty));
        Assert.Equal(1, m.Value("lorakit_test_total", "path=plain"));
        Assert.Equal("help with \\ a backslash\nand a newline", m.Families["lorakit_test_total"].Help);
        Assert.Equal(4, text.Count(ch => ch == '\n')); // HELP, TYPE, two samples: no raw newline leaked into a line
    }

    [Fact]
    public void ConcurrentUpdatesAreNotLost()
    {
        var s = new ServingMetrics();
        Parallel.For(0, 8, _ =>
        {
            for (int i = 0; i < 5000; i++) { s.OutputTokens(1); s.TimePerOutputToken(0.03); s.RequestFinished("stop"); }
        });
        var m = PrometheusParser.Parse(s.Render());
        Assert.Equal(40000, m.Value("lorakit_generation_tokens_total"));
        Assert.Equal(40000, m.Value("lorakit_time_per_output_token_seconds_count"));
        Assert.Equal(40000, m.Value("lorakit_time_per_output_token_seconds_bucket", "le=0.05"));
        Assert.Equal(40000 * 0.03, m.Value("lorakit_time_per_output_token_seconds_sum"), 6);
        Assert.Equal(40000, m.Value("lorakit_requests_total", "reason=stop"));
    }

    [Theory]
    [InlineData("# HELP x_total a\n# TYPE x_total counter\nx_total 1", "newline")]
    [InlineData("# TYPE x_total counter\nx_total 1\n", "lacks HELP")]
    [InlineData("# HELP x a\n# TYPE x counter\nx 1\n", "_total")]
    [InlineData("# HELP x_total a\n# TYPE x_total counter\nx_total{a=\"1\"} 1\nx_total{a=\"1\"} 2\n", "repeated")]
    [InlineData("# HELP h a\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", "cumulative")]
    [InlineData("# HELP h a\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", "_count")]
    [InlineData("# HELP h a\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", "+Inf")]
    [InlineData("# HELP g a\n# TYPE g gauge\ng{a=\"x\\q\"} 1\n", "escape")]
    [InlineData("# HELP g a\n# TYPE g gauge\ng one\n", "not a number")]
    [InlineData("# HELP g a\n# TYPE g gauge\nother 1\n", "outside")]
    public void TheTestParserRefusesMalformedText(string text, string why)
    {
        var e = Assert.Throws<FormatException>(() => PrometheusParser.Parse(text));
        Assert.Contains(why, e.Message);
    }
}
