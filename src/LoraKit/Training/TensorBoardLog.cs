using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// TensorBoard event files for a run (<c>report_to</c> tensorboard): TorchSharp's <c>SummaryWriter</c> into
/// RUN_DIR/tensorboard, one new events file per process (a resumed run adds one; TensorBoard reads them together).
/// Tags: <c>train/loss</c>, <c>train/lr</c>, <c>train/grad_norm</c>, <c>train/tokens_per_s</c>; <c>eval/loss</c>,
/// <c>eval/ppl</c>, <c>eval/accuracy</c> and <c>suite/NAME</c> (suite:NAME). Values are what metrics.jsonl holds, as
/// float32; non-finite values are left out. Wall times are Unix seconds (given explicitly: SummaryWriter's own default is not Unix time).
/// </summary>
public sealed class TensorBoardLog
{
    /// <summary>The folder inside the run directory.</summary>
    public const string Folder = "tensorboard";

    readonly TorchSharp.Modules.SummaryWriter _w;

    /// <summary>The event files' folder.</summary>
    public string Dir { get; }

    /// <summary>Starts an events file in <paramref name="runDir"/>/tensorboard.</summary>
    public TensorBoardLog(string runDir)
    {
        Dir = Path.Combine(runDir, Folder);
        _w = utils.tensorboard.SummaryWriter(Dir);
    }

    /// <summary>A logged training step.</summary>
    public void Step(StepMetrics m)
    {
        Add("train/loss", m.Loss, m.Step);
        Add("train/lr", m.Lr, m.Step);
        Add("train/grad_norm", m.GradNorm, m.Step);
        Add("train/tokens_per_s", m.TokensPerSecond, m.Step);
    }

    /// <summary>An evaluation: validation loss, perplexity and accuracy when validated; the suites' metrics.</summary>
    public void Eval(EvalMetrics m)
    {
        if (m.Validated)
        {
            Add("eval/loss", m.Loss, m.Step);
            if (m.Accuracy is double a) Add("eval/accuracy", a, m.Step);
            else Add("eval/ppl", m.Perplexity, m.Step);
        }
        foreach (var (name, value) in m.Suites ?? new Dictionary<string, double>())
            Add("suite/" + (name.StartsWith("suite:", StringComparison.Ordinal) ? name["suite:".Length..] : name), value, m.Step);
    }

    void Add(string tag, double value, int step)
    {
        if (double.IsFinite(value)) _w.add_scalar(tag, (float)value, step, DateTimeOffset.UtcNow.ToUnixTimeSeconds());
    }
}
