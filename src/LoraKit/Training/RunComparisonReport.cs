using System.Globalization;
using System.Net;
using System.Text;

namespace LoraKit.Training;

/// <summary>
/// The comparison written to a directory: <c>compare.html</c> (self-contained, the plots embedded as PNG, like a run's
/// report.html), the plots themselves (<c>loss.png</c>, one <c>metric-*.png</c> per evaluation metric) and
/// <c>compare.json</c>. Every plot overlays the runs, one colour per run, the legend naming them; in the loss plot a
/// run's validation loss is its colour dashed beside its solid training loss.
/// </summary>
public static class RunComparisonReport
{
    /// <summary>The HTML report's file name.</summary>
    public const string HtmlFile = "compare.html";

    /// <summary>Writes the report into <paramref name="dir"/> (created if absent; earlier files of the same names replaced); returns the HTML's path.</summary>
    public static string Write(RunComparison cmp, string dir)
    {
        if (File.Exists(dir)) throw new LoraKitException($"{dir} is a file; give a directory for the comparison report");
        Directory.CreateDirectory(dir);
        var plots = new List<(string title, string file)> { ("Loss", "loss.png") };
        PlotLoss(cmp.Runs, Path.Combine(dir, "loss.png"));
        foreach (var metric in cmp.Runs.SelectMany(r => r.Evals.Keys).Distinct().Order(StringComparer.Ordinal))
        {
            var file = $"metric-{metric.Replace(':', '-')}.png";
            PlotMetric(cmp.Runs, metric, Path.Combine(dir, file));
            plots.Add((metric, file));
        }
        File.WriteAllText(Path.Combine(dir, "compare.json"), cmp.ToJson().ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
        var html = Path.Combine(dir, HtmlFile);
        File.WriteAllText(html, Html(cmp, dir, plots));
        return html;
    }

    static string Html(RunComparison cmp, string dir, List<(string title, string file)> plots)
    {
        var h = new StringBuilder("<!doctype html><html><head><meta charset=\"utf-8\"><title>LoraKit run comparison</title><style>")
            .Append("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;margin-bottom:1em}")
            .Append("td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}img{max-width:100%}</style></head><body>")
            .Append("<h1>LoraKit run comparison</h1><table><tr><th>run</th><th>directory</th><th>base model</th><th>steps</th><th>wall s</th><th>tokens/s</th></tr>");
        foreach (var r in cmp.Runs)
            h.Append($"<tr><td>{Enc(r.Name)}</td><td>{Enc(r.Directory)}</td><td>{Enc(r.BaseModel ?? "—")}</td><td>{r.Steps}</td>")
             .Append($"<td>{Fmt(r.WallSeconds)}</td><td>{Fmt(r.TokensPerSecond)}</td></tr>");
        h.Append("</table>")
         .Append(Table("Configuration that differs", cmp, cmp.Config))
         .Append(Table("Metrics that differ", cmp, cmp.Metrics));
        foreach (var (title, file) in plots)
            h.Append($"<h2>{Enc(title)}</h2><img alt=\"{Enc(title)}\" src=\"data:image/png;base64,{Convert.ToBase64String(File.ReadAllBytes(Path.Combine(dir, file)))}\">");
        return h.Append("</body></html>").ToString();
    }

    static string Table(string title, RunComparison cmp, IReadOnlyList<ComparisonRow> rows)
    {
        var h = new StringBuilder($"<h2>{Enc(title)}</h2>");
        if (rows.Count == 0) return h.Append("<p>none</p>").ToString();
        h.Append("<table><tr><th></th>").Append(string.Concat(cmp.Runs.Select(r => $"<th>{Enc(r.Name)}</th>"))).Append("</tr>");
        foreach (var row in rows)
            h.Append($"<tr><th>{Enc(row.Key)}</th>").Append(string.Concat(row.Values.Select(v => $"<td>{Enc(v ?? "—")}</td>"))).Append("</tr>");
        return h.Append("</table>").ToString();
    }

    static string Fmt(double? x) => x?.ToString("0.##", CultureInfo.InvariantCulture) ?? "—";

    static string Enc(string s) => WebUtility.HtmlEncode(s);

    static ScottPlot.Color ColourOf(int run) => new ScottPlot.Palettes.Category10().GetColor(run);

    static void PlotLoss(IReadOnlyList<RunSummary> runs, string path)
    {
        var plt = NewPlot("Loss", "cross-entropy (nats/token)");
        for (int i = 0; i < runs.Count; i++)
        {
            AddSeries(plt, runs[i].TrainLoss, $"{runs[i].Name} train", ColourOf(i), dashed: false);
            if (runs[i].Evals.TryGetValue("eval_loss", out var ev)) AddSeries(plt, ev, $"{runs[i].Name} validation", ColourOf(i), dashed: true);
        }
        Save(plt, path);
    }

    static void PlotMetric(IReadOnlyList<RunSummary> runs, string metric, string path)
    {
        bool rate = (metric.StartsWith("suite:", StringComparison.Ordinal) && !TrainConfig.LowerIsBetter(metric)) || metric == "eval_accuracy"; // rates in percent
        var plt = NewPlot(metric, rate ? $"{metric} (%)" : metric);
        for (int i = 0; i < runs.Count; i++)
            if (runs[i].Evals.TryGetValue(metric, out var points))
                AddSeries(plt, rate ? points.Select(p => p with { Value = 100 * p.Value }).ToList() : points, runs[i].Name, ColourOf(i), dashed: false);
        Save(plt, path);
    }

    static ScottPlot.Plot NewPlot(string title, string yLabel)
    {
        var plt = new ScottPlot.Plot();
        plt.Title(title);
        plt.XLabel("step");
        plt.YLabel(yLabel);
        return plt;
    }

    static void AddSeries(ScottPlot.Plot plt, IReadOnlyList<MetricPoint> points, string label, ScottPlot.Color colour, bool dashed)
    {
        if (points.Count == 0) return;
        var s = plt.Add.Scatter(points.Select(p => (double)p.Step).ToArray(), points.Select(p => p.Value).ToArray());
        s.LegendText = label;
        s.Color = colour;
        s.LineWidth = 2;
        s.MarkerSize = points.Count > 50 ? 0 : 5;
        if (dashed) { s.LinePattern = ScottPlot.LinePattern.Dashed; s.MarkerShape = ScottPlot.MarkerShape.FilledSquare; } // told apart in the legend too
    }

    static void Save(ScottPlot.Plot plt, string path)
    {
        plt.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic { IntegerTicksOnly = true }; // steps are whole
        plt.ShowLegend(ScottPlot.Edge.Right); // outside the data: a legend inside hid the end of a curve
        plt.SavePng(path, 900, 480);
    }
}
