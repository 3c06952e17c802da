using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Training;

/// <summary>
/// metrics.jsonl: one JSON object per logged step and per evaluation. On resume, lines past the checkpoint's step are
/// dropped first, so the file reads as one uninterrupted run.
/// <para>
/// Records: a step <c>{"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}</c>; an
/// evaluation <c>{"step", "eval_loss", "eval_ppl" | "eval_accuracy", "suite:…"…, "is_best"}</c>, where the validation
/// fields are there when the run has validation data and the <c>suite:</c> ones (task, capability, safety pass rates
/// in [0, 1]; perplexity) when it has evaluation suites. With suites, the first record is the evaluation at step 0,
/// before training (the base model for a fresh adapter). A non-finite value is null.
/// </para>
/// </summary>
public sealed class MetricsLog : IDisposable
{
    readonly StreamWriter _w;

    public MetricsLog(string path, int resumeStep)
    {
        if (resumeStep > 0 && File.Exists(path))
        {
            var kept = File.ReadAllLines(path).Where(l => StepOf(l) is int s && s <= resumeStep).ToList(); // a line cut off by a kill goes too
            File.WriteAllLines(path, kept);
        }
        else if (File.Exists(path)) File.Delete(path);
        _w = new StreamWriter(path, append: true) { AutoFlush = true };
    }

    public void Step(StepMetrics m) => Write(new
    {
        step = m.Step, epoch = F(Math.Round(m.Epoch, 4)), loss = F(m.Loss), lr = F(m.Lr), grad_norm = F(m.GradNorm), tokens = m.Tokens,
        tokens_per_s = F(Math.Round(m.TokensPerSecond, 1)), elapsed_s = F(Math.Round(m.ElapsedSeconds, 3)),
    });

    public void Eval(EvalMetrics m)
    {
        var o = new JsonObject { ["step"] = m.Step };
        if (m.Validated)
        {
            o["eval_loss"] = F(m.Loss);
            if (m.Accuracy is double a) o["eval_accuracy"] = F(a);
            else o["eval_ppl"] = F(m.Perplexity);
        }
        foreach (var (name, value) in m.Suites ?? new Dictionary<string, double>()) o[name] = F(value);
        o["is_best"] = m.IsBest;
        _w.WriteLine(o.ToJsonString());
    }

    /// <summary>JSON has no NaN or infinity: a non-finite value is written as null.</summary>
    public static double? F(double x) => double.IsFinite(x) ? x : null;

    static int? StepOf(string line)
    {
        if (line.Length == 0) return null;
        try { return JsonNode.Parse(line)?["step"]?.GetValue<int>(); }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException) { return null; }
    }

    void Write(object o) => _w.WriteLine(JsonSerializer.Serialize(o));

    public void Dispose() => _w.Dispose();

    /// <summary>Reads (step, loss) and (step, eval_loss) series back for plots.</summary>
    public static (List<(int step, double loss)> train, List<(int step, double loss)> eval) Read(string path)
    {
        var train = new List<(int, double)>();
        var eval = new List<(int, double)>();
        if (!File.Exists(path)) return (train, eval);
        foreach (var line in File.ReadLines(path))
        {
            if (StepOf(line) is not int step || JsonNode.Parse(line) is not JsonObject o) continue;
            if (o["loss"] is JsonValue l && l.TryGetValue<double>(out var lv)) train.Add((step, lv));
            if (o["eval_loss"] is JsonValue e && e.TryGetValue<double>(out var ev)) eval.Add((step, ev));
        }
        return (train, eval);
    }

    /// <summary>Reads the evaluation suites' series back for plots: metric name (suite:task, …) → (step, value), in file order; nulls left out.</summary>
    public static Dictionary<string, List<(int step, double value)>> ReadSuites(string path)
    {
        var series = new Dictionary<string, List<(int, double)>>(StringComparer.Ordinal);
        if (!File.Exists(path)) return series;
        foreach (var line in File.ReadLines(path))
        {
            if (StepOf(line) is not int step || JsonNode.Parse(line) is not JsonObject o) continue;
            foreach (var (name, node) in o)
                if (name.StartsWith("suite:", StringComparison.Ordinal) && node is JsonValue v && v.TryGetValue<double>(out var x))
                    (series.TryGetValue(name, out var list) ? list : series[name] = []).Add((step, x));
        }
        return series;
    }
}
