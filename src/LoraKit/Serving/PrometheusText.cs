using System.Collections.Concurrent;
using System.Globalization;

namespace LoraKit.Serving;

// Prometheus text exposition format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/): metric
// families (counter, gauge, histogram) with fixed label names, each rendered as "# HELP", "# TYPE" and one sample line
// per label set ("name{label="value",...} value\n"); histograms as cumulative _bucket{le=...} lines ending at +Inf,
// then _sum and _count. Updates are thread-safe and cheap (the engine thread records every step); rendering takes a
// consistent snapshot per histogram cell. Label values must come from small fixed sets: every distinct value is a time
// series in Prometheus forever, so nothing client-chosen (adapter names, raw paths, methods) ever becomes a label.
// LoraKit renders this itself rather than through prometheus-net: see ServingMetrics' header for why.

/// <summary>Formatting rules of the text exposition format shared by the metric families.</summary>
internal static class PrometheusText
{
    /// <summary>The Content-Type of a scrape response in this format.</summary>
    public const string ContentType = "text/plain; version=0.0.4; charset=utf-8";

    /// <summary>A sample value as Go's ParseFloat reads it: shortest round-trip digits, +Inf, -Inf, NaN.</summary>
    public static string Number(double v) =>
        double.IsPositiveInfinity(v) ? "+Inf" : double.IsNegativeInfinity(v) ? "-Inf" : double.IsNaN(v) ? "NaN" : v.ToString("R", CultureInfo.InvariantCulture);

    /// <summary>A label value between double quotes: backslash, double quote and newline escaped.</summary>
    public static string LabelValue(string s) => s.Replace("\\", @"\\").Replace("\"", "\\\"").Replace("\n", @"\n");

    /// <summary>HELP text: backslash and newline escaped (quotes stay as they are).</summary>
    public static string Help(string s) => s.Replace("\\", @"\\").Replace("\n", @"\n");

    /// <summary>"{a="x",b="y"}" for the given names and values (plus an optional extra pair, e.g. le), "" for none.</summary>
    public static string Labels(string[] names, string[] values, string? extraName = null, string? extraValue = null)
    {
        if (names.Length == 0 && extraName is null) return "";
        var parts = names.Select((n, i) => $"{n}=\"{LabelValue(values[i])}\"");
        if (extraName is not null) parts = parts.Append($"{extraName}=\"{LabelValue(extraValue!)}\"");
        return "{" + string.Join(",", parts) + "}";
    }
}

/// <summary>One metric family: a name, its help and type line, and one cell per label set.</summary>
internal abstract class MetricFamily<TCell>(string name, string help, string type, string[] labelNames, Func<TCell> make) : IMetricFamily
    where TCell : class
{
    readonly ConcurrentDictionary<string, (string[] values, TCell cell)> _cells = new(StringComparer.Ordinal);

    public string Name => name;

    /// <summary>The cell of these label values (as many as the family's label names), made on first use.</summary>
    public TCell Of(params string[] values)
    {
        if (values.Length != labelNames.Length)
            throw new ArgumentException($"{name} takes {labelNames.Length} label value(s) ({string.Join(", ", labelNames)}), not {values.Length}");
        var key = string.Join('\u0000', values);
        return _cells.TryGetValue(key, out var hit) ? hit.cell : _cells.GetOrAdd(key, _ => ((string[])values.Clone(), make())).cell;
    }

    public void Write(TextWriter w)
    {
        w.Write($"# HELP {name} {PrometheusText.Help(help)}\n# TYPE {name} {type}\n");
        // Label sets in a stable order, so two scrapes of the same state are the same text.
        foreach (var (values, cell) in _cells.Values.OrderBy(c => string.Join('\u0000', c.values), StringComparer.Ordinal))
            WriteCell(w, name, labelNames, values, cell);
    }

    protected abstract void WriteCell(TextWriter w, string name, string[] labelNames, string[] values, TCell cell);
}

/// <summary>A metric family of any kind, as a renderer sees it.</summary>
internal interface IMetricFamily
{
    string Name { get; }
    void Write(TextWriter w);
}

/// <summary>A value that only goes up (its name ends in _total).</summary>
internal sealed class CounterCell
{
    double _v;
    public double Value => Volatile.Read(ref _v);

    public void Add(double d)
    {
        if (!(d >= 0)) throw new ArgumentOutOfRangeException(nameof(d), d, "a counter only goes up");
        double seen = Volatile.Read(ref _v);
        while (true)
        {
            double now = Interlocked.CompareExchange(ref _v, seen + d, seen);
            if (now.Equals(seen)) return;
            seen = now;
        }
    }
}

/// <summary>A value that is set (queue length, cache use).</summary>
internal sealed class GaugeCell
{
    double _v;
    public double Value => Volatile.Read(ref _v);
    public void Set(double v) => Interlocked.Exchange(ref _v, v);
}

/// <summary>Observations counted into fixed buckets, with their sum and count.</summary>
internal sealed class HistogramCell(double[] bounds)
{
    readonly long[] _counts = new long[bounds.Length + 1]; // per bucket, not cumulative; the last one is (bounds[^1], +Inf)
    double _sum;
    long _count;

    /// <summary>Counts <paramref name="v"/> in the first bucket whose upper bound is ≥ it; NaN is dropped (it would poison the sum).</summary>
    public void Observe(double v)
    {
        if (double.IsNaN(v)) return;
        int i = Array.BinarySearch(bounds, v);
        if (i < 0) i = ~i; // the first bound above v (bounds.Length: +Inf)
        lock (_counts)
        {
            _counts[i]++;
            _sum += v;
            _count++;
        }
    }

    /// <summary>Cumulative counts per bound (the last is +Inf, equal to the count), the sum and the count, taken together.</summary>
    public (long[] cumulative, double sum, long count) Snapshot()
    {
        lock (_counts)
        {
            var c = new long[_counts.Length];
            long run = 0;
            for (int i = 0; i < c.Length; i++) c[i] = run += _counts[i];
            return (c, _sum, _count);
        }
    }
}

internal sealed class CounterFamily(string name, string help, params string[] labelNames)
    : MetricFamily<CounterCell>(name, help, "counter", labelNames, () => new CounterCell())
{
    protected override void WriteCell(TextWriter w, string name, string[] labelNames, string[] values, CounterCell cell) =>
        w.Write($"{name}{PrometheusText.Labels(labelNames, values)} {PrometheusText.Number(cell.Value)}\n");
}

internal sealed class GaugeFamily(string name, string help, params string[] labelNames)
    : MetricFamily<GaugeCell>(name, help, "gauge", labelNames, () => new GaugeCell())
{
    protected override void WriteCell(TextWriter w, string name, string[] labelNames, string[] values, GaugeCell cell) =>
        w.Write($"{name}{PrometheusText.Labels(labelNames, values)} {PrometheusText.Number(cell.Value)}\n");
}

internal sealed class HistogramFamily : MetricFamily<HistogramCell>
{
    readonly double[] _bounds;

    /// <param name="bounds">Bucket upper bounds, ascending, finite (the +Inf bucket is implied).</param>
    public HistogramFamily(string name, string help, double[] bounds, params string[] labelNames)
        : base(name, help, "histogram", labelNames, () => new HistogramCell(bounds))
    {
        if (bounds.Length == 0 || bounds.Any(b => !double.IsFinite(b)) || bounds.Zip(bounds.Skip(1)).Any(p => p.First >= p.Second))
            throw new ArgumentException($"{name}: bucket bounds must be finite and strictly ascending");
        if (labelNames.Contains("le")) throw new ArgumentException($"{name}: 'le' is the bucket label of a histogram");
        _bounds = bounds;
    }

    protected override void WriteCell(TextWriter w, string name, string[] labelNames, string[] values, HistogramCell cell)
    {
        var (cumulative, sum, count) = cell.Snapshot();
        for (int i = 0; i <= _bounds.Length; i++)
        {
            string le = i < _bounds.Length ? PrometheusText.Number(_bounds[i]) : "+Inf";
            w.Write($"{name}_bucket{PrometheusText.Labels(labelNames, values, "le", le)} {cumulative[i]}\n");
        }
        string labels = PrometheusText.Labels(labelNames, values);
        w.Write($"{name}_sum{labels} {PrometheusText.Number(sum)}\n{name}_count{labels} {count}\n");
    }
}
