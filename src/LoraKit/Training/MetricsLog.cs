using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Training;

/// <summary>
/// metrics.jsonl: one JSON object per logged step and per evaluation. On resume, lines past the checkpoint's step are
/// dropped first, so the file reads as one uninterrupted run.
/// </summary>
public sealed class MetricsLog : IDisposable
{
    readonly StreamWriter _w;

    public MetricsLog(string path, int resumeStep)
    {
        if (resumeStep > 0 && File.Exists(path))
        {
            var kept = File.ReadAllLines(path).Where(l => l.Length > 0 && (JsonNode.Parse(l)?["step"]?.GetValue<int>() ?? 0) <= resumeStep).ToList();
            File.WriteAllLines(path, kept);
        }
        else if (File.Exists(path)) File.Delete(path);
        _w = new StreamWriter(path, append: true) { AutoFlush = true };
    }

    public void Step(StepMetrics m) => Write(new
    {
        step = m.Step, epoch = Math.Round(m.Epoch, 4), loss = m.Loss, lr = m.Lr, grad_norm = m.GradNorm, tokens = m.Tokens,
        tokens_per_s = Math.Round(m.TokensPerSecond, 1), elapsed_s = Math.Round(m.ElapsedSeconds, 3),
    });

    public void Eval(EvalMetrics m) => Write(m.Accuracy is double a
        ? new { step = m.Step, eval_loss = m.Loss, eval_accuracy = a, is_best = m.IsBest }
        : (object)new { step = m.Step, eval_loss = m.Loss, eval_ppl = m.Perplexity, is_best = m.IsBest });

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
            if (JsonNode.Parse(line) is not JsonObject o) continue;
            int step = o["step"]!.GetValue<int>();
            if (o["loss"] is JsonNode l) train.Add((step, l.GetValue<double>()));
            if (o["eval_loss"] is JsonNode e) eval.Add((step, e.GetValue<double>()));
        }
        return (train, eval);
    }
}
