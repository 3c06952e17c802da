using System.Net;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Training;

/// <summary>
/// The end-of-run report in the output directory: report.json (machine-readable), loss.png (train and validation
/// curves, ScottPlot) and report.html (self-contained: the plot embedded, the config, data summary and metrics). A run
/// with evaluation suites adds suites.png (their pass rates by step, from step 0, and perplexity on a second axis),
/// their table in report.html and <c>suites</c> in report.json.
/// </summary>
public static class TrainReport
{
    /// <summary>The evaluation suites' plot, written only by a run that has them.</summary>
    public const string SuitesPlot = "suites.png";

    /// <summary>
    /// Writes report.json, report.html and the plots for the run <paramref name="r"/>; <paramref name="initAdapter"/> (the
    /// adapter the run started from: path, sha256, ref) goes into report.json as <c>init_adapter</c> when there was one.
    /// </summary>
    public static void Write(TrainConfig c, TrainResult r, string metricsPath, JsonObject? initAdapter = null)
    {
        var (train, eval) = MetricsLog.Read(metricsPath);
        var png = Path.Combine(r.OutputDir, "loss.png");
        Plot(train, eval, png);
        var suites = MetricsLog.ReadSuites(metricsPath);
        var suitesPng = Path.Combine(r.OutputDir, SuitesPlot);
        if (suites.Count > 0) PlotSuites(suites, suitesPng);

        var summary = new
        {
            method = c.Method,
            steps = r.Steps,
            stopped_early = r.StoppedEarly,
            wall_seconds = Math.Round(r.WallSeconds, 2),
            trainable = r.TrainableReport,
            final_train_loss = MetricsLog.F(r.FinalLoss),
            best_eval = r.Best is null ? null : new { step = r.Best.Step, eval_loss = MetricsLog.F(r.Best.Loss), eval_ppl = MetricsLog.F(r.Best.Perplexity), eval_accuracy = r.Best.Accuracy },
            last_eval = r.LastEval is null ? null : new { step = r.LastEval.Step, eval_loss = MetricsLog.F(r.LastEval.Loss), eval_ppl = MetricsLog.F(r.LastEval.Perplexity), eval_accuracy = r.LastEval.Accuracy },
            data = Data(r.Data),
            validation = r.Validation is null ? null : Data(r.Validation),
            adapter = r.AdapterDir,
            config = c.ToJsonObject(),
        };
        var json = JsonSerializer.SerializeToNode(summary)!.AsObject();
        if (initAdapter is not null) json["init_adapter"] = initAdapter.DeepClone();
        double? cost = RunStats.Cost(Math.Round(r.WallSeconds, 2), c.GpuHourCost); // from the wall_seconds written, so the file agrees with itself
        if (r.Stats is { } st) AddStats(json, st, cost, c.GpuHourCost);
        // Only a run with suites has these, so a run without keeps its report as it was.
        if (suites.Count > 0)
        {
            json["suites"] = new JsonObject(suites.Select(kv => KeyValuePair.Create(kv.Key,
                (JsonNode?)new JsonArray(kv.Value.Select(p => (JsonNode?)new JsonObject { ["step"] = p.step, ["value"] = p.value }).ToArray()))));
            if (r.Best?.Suites is { } bs) json["best_eval"]!["suites"] = JsonSerializer.SerializeToNode(bs);
            if (r.LastEval?.Suites is { } ls) json["last_eval"]!["suites"] = JsonSerializer.SerializeToNode(ls);
        }
        File.WriteAllText(Path.Combine(r.OutputDir, "report.json"), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));

        var h = new StringBuilder();
        h.Append("<!doctype html><html><head><meta charset=\"utf-8\"><title>LoraKit training report</title><style>")
         .Append("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}table{border-collapse:collapse}")
         .Append("td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>")
         .Append("<h1>LoraKit training report</h1>")
         .Append($"<p>{Enc(c.Method == "lora" ? "LoRA" : "Full fine-tune")} of <code>{Enc(c.Model)}</code> on <code>{Enc(c.Data)}</code> — {r.Steps} steps in {r.WallSeconds:F1} s{(r.StoppedEarly ? " (stopped early)" : "")}.</p>")
         .Append("<table>")
         .Append(r.Stats is { } rs ? Row("device", rs.Describe()) + Row("started", Iso(rs.Started)) + Row("tokens", $"{rs.Tokens:N0} ({rs.TokensPerSecond:N0} tokens/s)")
                 + (rs.PeakMemoryGib is double pm ? Row("peak memory", $"{pm:F2} GiB ({(rs.PeakMemoryKind == Runtime.Cuda.DeviceInfo.CudaMaxAllocated ? "CUDA allocator, max allocated" : "process peak working set")})") : "") : "")
         .Append(cost is double co ? Row("cost", $"{co:0.######} ({r.WallSeconds / 3600:0.####} h × {c.GpuHourCost} per GPU-hour{(r.Stats?.Device == "cpu" ? ", billed on CPU wall hours" : "")})") : "")
         .Append(Row("trainable", r.TrainableReport))
         .Append(Row("final train loss", $"{r.FinalLoss:F4}"))
         .Append(Row("best eval loss", r.Best is null ? "—" : $"{r.Best.Loss:F4} (perplexity {r.Best.Perplexity:F2}) at step {r.Best.Step}"))
         .Append(r.Best?.Accuracy is double acc ? Row("best eval accuracy", $"{acc:P1} at step {r.Best.Step}") : "")
         .Append(Row("last eval loss", r.LastEval is null ? "—" : $"{r.LastEval.Loss:F4} (perplexity {r.LastEval.Perplexity:F2}) at step {r.LastEval.Step}"))
         .Append(Row("training data", Describe(r.Data)))
         .Append(Row("validation data", r.Validation is null ? (c.ValidationFraction > 0 ? $"{c.ValidationFraction:P0} held out" : "—") : Describe(r.Validation)))
         .Append(Row("output", r.AdapterDir))
         .Append("</table>")
         .Append($"<h2>Loss</h2><img alt=\"loss curve\" src=\"data:image/png;base64,{Convert.ToBase64String(File.ReadAllBytes(png))}\">")
         .Append(suites.Count > 0 ? SuitesSection(suites, suitesPng) : "")
         .Append($"<h2>Configuration</h2><pre>{Enc(c.ToJson())}</pre></body></html>");
        File.WriteAllText(Path.Combine(r.OutputDir, "report.html"), h.ToString());
    }

    /// <summary>ISO-8601 UTC with milliseconds, as the registry writes its times.</summary>
    public static string Iso(DateTimeOffset t) => t.UtcDateTime.ToString("yyyy-MM-ddTHH:mm:ss.fffZ", System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>Where and how fast the run ran; <c>cost</c> (with its rate and the hours billed) only when a GPU-hour cost was given.</summary>
    static void AddStats(JsonObject json, RunStats st, double? cost, double? rate)
    {
        json["started"] = Iso(st.Started);
        json["ended"] = Iso(st.Ended);
        json["device"] = st.Device;
        json["device_name"] = st.DeviceName;
        json["dtype"] = st.DType;
        json["tokens"] = st.Tokens;
        json["tokens_per_s"] = Math.Round(st.TokensPerSecond, 1);
        json["peak_memory_gib"] = st.PeakMemoryGib is double g ? Math.Round(g, 3) : null;
        json["peak_memory_kind"] = st.PeakMemoryKind;
        if (cost is double c)
        {
            json["cost"] = c;
            json["gpu_hour_cost"] = rate;
            json["cost_hours"] = Math.Round((double)json["wall_seconds"]! / 3600, 6);
        }
    }
    static object Data(Data.DataSummary d) => new { path = d.Path, format = d.Format.ToString(), samples = d.Samples, tokens = d.Tokens, target_tokens = d.TargetTokens, skipped_lines = d.Skipped, truncated = d.Truncated, sha256 = d.Sha256, bytes = d.Bytes };

    static string Describe(Data.DataSummary d) =>
        $"{d.Path}: {d.Samples} samples ({d.Format}), {d.Tokens:N0} tokens, {d.TargetTokens:N0} trained, {d.Skipped} skipped lines, {d.Truncated} truncated";

    static string Row(string k, string v) => $"<tr><th>{Enc(k)}</th><td>{Enc(v)}</td></tr>";

    static string Enc(string s) => WebUtility.HtmlEncode(s);

    /// <summary>The suites' plot and a table: one row per evaluation (step 0 first, before training), one column per metric.</summary>
    static string SuitesSection(Dictionary<string, List<(int step, double value)>> suites, string png)
    {
        var h = new StringBuilder("<h2>Evaluation suites</h2><p>Step 0 is the model before training (the base model for a fresh adapter).</p>")
            .Append($"<img alt=\"evaluation suites\" src=\"data:image/png;base64,{Convert.ToBase64String(File.ReadAllBytes(png))}\">")
            .Append("<table><tr><th>step</th>").Append(string.Concat(suites.Keys.Select(k => $"<th>{Enc(k)}</th>"))).Append("</tr>");
        foreach (int step in suites.Values.SelectMany(v => v.Select(p => p.step)).Distinct().Order())
        {
            h.Append($"<tr><td>{step}</td>");
            foreach (var (name, points) in suites)
            {
                int at = points.FindLastIndex(p => p.step == step);
                h.Append("<td>").Append(at >= 0 ? Enc(Format(name, points[at].value)) : "—").Append("</td>");
            }
            h.Append("</tr>");
        }
        return h.Append("</table>").ToString();
    }

    /// <summary>A suite metric as people read it: pass rates in percent, perplexity as a number.</summary>
    public static string Format(string name, double value) =>
        TrainConfig.LowerIsBetter(name) ? value.ToString("F2", System.Globalization.CultureInfo.InvariantCulture)
            : (100 * value).ToString("F1", System.Globalization.CultureInfo.InvariantCulture) + "%";

    /// <summary>Pass rates (percent, left axis) by step; perplexity, whose scale is not a rate's, on the right axis.</summary>
    static void PlotSuites(Dictionary<string, List<(int step, double value)>> suites, string path)
    {
        var plt = new ScottPlot.Plot();
        bool right = false;
        foreach (var (name, points) in suites)
        {
            bool rate = !TrainConfig.LowerIsBetter(name);
            var s = plt.Add.Scatter(points.Select(p => (double)p.step).ToArray(), points.Select(p => rate ? 100 * p.value : p.value).ToArray());
            s.LegendText = name;
            s.MarkerSize = 6;
            if (!rate) { s.Axes.YAxis = plt.Axes.Right; right = true; }
        }
        plt.Title("Evaluation suites");
        plt.XLabel("step");
        plt.YLabel("pass rate (%)");
        if (right) plt.Axes.Right.Label.Text = "perplexity";
        plt.ShowLegend();
        plt.SavePng(path, 800, 450);
    }

    static void Plot(List<(int step, double loss)> train, List<(int step, double loss)> eval, string path)
    {
        var plt = new ScottPlot.Plot();
        if (train.Count > 0)
        {
            var s = plt.Add.Scatter(train.Select(p => (double)p.step).ToArray(), train.Select(p => p.loss).ToArray());
            s.LegendText = "train loss";
            s.MarkerSize = train.Count > 50 ? 0 : 4;
        }
        if (eval.Count > 0)
        {
            var e = plt.Add.Scatter(eval.Select(p => (double)p.step).ToArray(), eval.Select(p => p.loss).ToArray());
            e.LegendText = "validation loss";
            e.MarkerSize = 6;
        }
        plt.Title("Loss");
        plt.XLabel("step");
        plt.YLabel("cross-entropy (nats/token)");
        plt.ShowLegend();
        plt.SavePng(path, 800, 450);
    }
}
