using System.Text.Json.Nodes;
using LoraKit.Classification;
using LoraKit.Lora;
using LoraKit.Tokenization;

namespace LoraKit.Evaluation;

/// <summary>How <see cref="SuiteEvaluation.Run"/> runs and judges.</summary>
public sealed record EvalOptions
{
    public GateThresholds Gate { get; init; } = new();
    /// <summary>Recorded in the report: the gate was asked for (the CLI then exits 3 when an adapter fails it).</summary>
    public bool GateEnforced { get; init; }
    /// <summary>Rows generated together.</summary>
    public int MaxBatch { get; init; } = 32;
    /// <summary>Judge for rubric cases (null: they are skipped).</summary>
    public RubricJudgeFunc? Judge { get; init; }
    /// <summary>Called after every case on every model: (cases done, cases in all, the model being run: "base" or the adapter).</summary>
    public Action<int, int, string>? Progress { get; init; }
    /// <summary>Extra settings recorded in the report (device, dtype, judge).</summary>
    public JsonObject Settings { get; init; } = new();
}

/// <summary>
/// <c>lorakit eval</c>'s work: the base and each adapter on the same cases, in one process with the base weights loaded
/// once. Every adapter is checked (exists, readable task type, fits this base, content hash) before anything runs; causal-LM adapters
/// are loaded into the one model in turn and removed after their run; a classification adapter gets a classifier of
/// its own (base weights loaded a second time while it runs), which scores the label cases.
/// </summary>
public static class SuiteEvaluation
{
    /// <summary>Evaluates the base (<paramref name="lm"/>, adapters disabled) and each adapter directory; returns the report.</summary>
    public static EvalReport Run(LoraModel lm, Tokenizer tokenizer, ChatTemplate? template, IReadOnlyCollection<int> eosTokenIds, string modelDir,
        IReadOnlyList<string> adapterDirs, IReadOnlyList<EvalSuite> suites, EvalOptions? options = null)
    {
        options ??= new EvalOptions();
        options.Gate.Validate();
        if (suites.Count == 0) throw new LoraKitException("give at least one suite");
        var fingerprint = lm.Model.Fingerprint ?? throw new LoraKitException("the base model was not loaded from a checkpoint, so it has no fingerprint to record");
        var adapters = adapterDirs.Select(d =>
        {
            if (!Directory.Exists(d)) throw new LoraKitException($"adapter directory '{d}' does not exist");
            var task = AdapterFiles.Task(d);
            // Read and validated (another base, shapes, non-finite weights) now, not after minutes of the base's run.
            using (AdapterFiles.Read(lm, d, new AdapterLoadOptions { SequenceClassification = task.IsSequenceClassification, Warn = null })) { }
            return (dir: d, task, sha: AdapterDigest.Compute(d));
        }).ToList();
        var runner = new CaseRunner(lm, tokenizer, template, eosTokenIds, suites) { MaxBatch = options.MaxBatch, Judge = options.Judge };
        int total = runner.CaseCount * (1 + adapters.Count), done = 0;
        Action Tick(string model) => () => options.Progress?.Invoke(++done, total, model);

        var baseResults = runner.Run(null, onDone: Tick("base"));
        done = runner.CaseCount;
        var evals = new List<AdapterEval>();
        foreach (var (a, i) in adapters.Select((a, i) => (a, i)))
        {
            var results = a.task.IsSequenceClassification ? RunClassifier(runner, lm, modelDir, a.dir, Tick(a.dir)) : RunAdapter(runner, lm, a.dir, FreeName(lm, i), Tick(a.dir));
            done = runner.CaseCount * (i + 2);
            var comparison = Comparison.Of(baseResults, results);
            evals.Add(new AdapterEval(a.dir, a.sha, results, comparison, GateResult.Decide(comparison, options.Gate)));
        }
        var settings = (JsonObject)options.Settings.DeepClone();
        settings["max_batch"] = options.MaxBatch;
        settings["dtype"] ??= lm.Model.DType.ToString();
        settings["device"] ??= lm.Model.Device.ToString();
        return new EvalReport
        {
            Model = modelDir, BaseFingerprint = fingerprint, Suites = suites, BaseResults = baseResults, Adapters = evals,
            Thresholds = options.Gate, GateEnforced = options.GateEnforced, Settings = settings,
        };
    }

    /// <summary>A name no adapter on the model has: the run deletes its adapter afterwards, and must not delete the caller's.</summary>
    static string FreeName(LoraModel lm, int i) =>
        Enumerable.Range(0, int.MaxValue).Select(k => k == 0 ? $"eval-{i}" : $"eval-{i}-{k}").First(n => !lm.Configs.ContainsKey(n));

    static List<CaseResult> RunAdapter(CaseRunner runner, LoraModel lm, string dir, string name, Action tick)
    {
        AdapterFiles.Load(lm, name, dir);
        try { return runner.Run(name, onDone: tick); }
        finally { lm.DeleteAdapter(name); }
    }

    static List<CaseResult> RunClassifier(CaseRunner runner, LoraModel lm, string modelDir, string dir, Action tick)
    {
        using var clf = TextClassifier.Load(modelDir, dir, lm.Model.DType, lm.Model.Device);
        return runner.Run(null, ids => clf.ClassifyIds(ids).Select(p => p.Label).ToList(), tick);
    }
}
