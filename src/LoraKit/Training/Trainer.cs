using System.Diagnostics;
using System.Security.Cryptography;
using System.Text.Json.Nodes;
using LoraKit.Accelerated;
using LoraKit.Data;
using LoraKit.Distributed;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Runtime.Cuda;
using LoraKit.Tokenization;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>One optimizer step as logged: its loss, learning rate, gradient norm (before clipping) and throughput.</summary>
public sealed record StepMetrics(int Step, int TotalSteps, double Epoch, double Loss, double Lr, double GradNorm, long Tokens, double TokensPerSecond, double ElapsedSeconds);

/// <summary>
/// One evaluation: mean validation loss per target token, its perplexity, accuracy (classification), the evaluation
/// suites' metrics (<see cref="Suites"/>) and whether it is the best so far. A run with evaluation suites but no
/// validation data evaluates the suites only (<see cref="Validated"/> false; the loss is NaN).
/// </summary>
public sealed record EvalMetrics(int Step, double Loss, double Perplexity, bool IsBest, double? Accuracy = null)
{
    /// <summary>What the <see cref="IStepEvaluator"/> reported at this step (suite:task, …), or null without evaluation suites.</summary>
    public IReadOnlyDictionary<string, double>? Suites { get; init; }

    /// <summary>Whether validation data was evaluated (<see cref="Loss"/>, <see cref="Perplexity"/>, <see cref="Accuracy"/> mean something).</summary>
    public bool Validated { get; init; } = true;

    /// <summary>The value of <paramref name="metric"/> (eval_loss, eval_accuracy, suite:…): NaN when this evaluation has none.</summary>
    public double Value(string metric) => metric switch
    {
        "eval_loss" => Validated ? Loss : double.NaN,
        "eval_accuracy" => Validated && Accuracy is double a ? a : double.NaN,
        _ => Suites?.GetValueOrDefault(metric, double.NaN) ?? double.NaN,
    };

    /// <summary>The value the configured metric compares, lower being better (a metric better larger enters negated; NaN never compares better).</summary>
    public double Key(string metric) => TrainConfig.LowerIsBetter(metric) ? Value(metric) : -Value(metric);
}

/// <summary>What the trainer reports while it runs (progress bar, log lines).</summary>
public interface ITrainLog
{
    void Info(string message);
    void Warn(string message);
    void Step(StepMetrics m);
    void Eval(EvalMetrics m);
}

/// <summary>A run stopped on request (Ctrl+C, SIGTERM) after saving a checkpoint and the adapter so far.</summary>
public sealed class TrainingInterruptedException(int step, int totalSteps, string checkpoint, string adapterDir)
    : LoraKitException($"training interrupted at step {step} of {totalSteps}: saved checkpoint {checkpoint} and the adapter so far in {adapterDir}")
{
    public int Step { get; } = step;
    public string Checkpoint { get; } = checkpoint;
    public string AdapterDir { get; } = adapterDir;
}

/// <summary>
/// A training step whose loss or gradient norm is not finite: nothing of it was applied (the weights are those of the
/// step before). The message says which value and at which step.
/// </summary>
public sealed class NonFiniteStepException(string message) : LoraKitException(message);

/// <summary>An <see cref="ITrainLog"/> that drops everything (the in-memory trainer reports through its return values).</summary>
sealed class SilentLog : ITrainLog
{
    public static readonly SilentLog Instance = new();
    public void Info(string message) { }
    public void Warn(string message) { }
    public void Step(StepMetrics m) { }
    public void Eval(EvalMetrics m) { }
}

/// <summary>What <see cref="Trainer.Run"/> did: where the result is, how far it got, its losses and data.</summary>
public sealed record TrainResult(string OutputDir, string AdapterDir, int Steps, double FinalLoss, EvalMetrics? Best, EvalMetrics? LastEval,
    string TrainableReport, DataSummary Data, DataSummary? Validation, double WallSeconds, bool StoppedEarly)
{
    /// <summary>Start, end, device, tokens, throughput and peak memory of this process's run (null for a resumed run that had nothing left to do).</summary>
    public RunStats? Stats { get; init; }
}

/// <summary>
/// Training a LoRA adapter, in two layers. The instance is the training step over in-memory samples: built from a
/// model, an adapter config, options and examples, its <see cref="Step"/> runs one optimizer step (micro-batches
/// accumulated with the loss normalised by the target tokens of the whole accumulated batch, so accumulation equals one
/// big batch; clip; AdamW on the schedule), <see cref="Evaluate"/> measures a mean loss, <see cref="Save"/> writes a
/// PEFT adapter. <see cref="Run"/> is <c>lorakit train</c> on top of it, top to bottom: load data and model from files,
/// then step, log, evaluate, checkpoint and resume in a run directory; finally save the adapter and the report.
/// </summary>
public sealed class Trainer : IDisposable
{
    /// <summary>The adapter name a training run trains (and PEFT's default name).</summary>
    public const string AdapterName = "default";

    TrainConfig _c = null!;
    ITrainLog _log = SilentLog.Instance;
    LoraModel _lm = null!;
    CausalLM _model = null!;
    Tokenizer _tok = null!;
    Device _device = null!;
    string _name = AdapterName;
    List<(string name, Parameter param)> _trainable = null!;
    SequenceClassifier? _classifier;
    RngStream _rng = null!;
    AdamW _optimizer = null!;
    Batches _batches = null!;
    GraphedStep _lmStep = null!;
    IDisposable? _sideStream;
    bool _graphed, _graphWarned;
    int _padId, _microPerStep;
    Func<List<Sample>, double, Tensor> _backwardOf = null!;
    Func<List<Sample>, long> _countOf = null!;
    ICollectives? _group;
    DataShard _shard = null!;
    GradientBuckets? _buckets;

    /// <summary>
    /// Trains a fresh LoRA adapter named <paramref name="adapterName"/> on <paramref name="model"/> over
    /// <paramref name="examples"/> (all of one shape: text, prompt/completion or chat), tokenised by
    /// <paramref name="tokenizer"/>. <paramref name="lora"/> defaults to the adapter <paramref name="options"/> describes
    /// (r, lora_alpha, lora_dropout, target_modules); <paramref name="options"/> defaults to <see cref="TrainConfig"/>'s
    /// recipe (its data, output and evaluation fields are not used here). The adapter becomes the model's active one, so
    /// the model generates with it as it trains. <c>LoraKitModel.CreateTrainer</c> is the usual way to get one.
    /// </summary>
    public Trainer(LoraModel model, Tokenizer tokenizer, IEnumerable<TrainingExample> examples, LoraConfig? lora = null,
        TrainConfig? options = null, string adapterName = AdapterName, string? modelDir = null)
        : this(model, tokenizer, examples, lora, options, adapterName, modelDir, group: null) { }

    /// <summary>
    /// The in-memory trainer as one rank of a data-parallel <paramref name="group"/> (null: alone): each rank's model
    /// holds the same adapter, takes its <see cref="DataShard"/> of every global batch, and its steps equal those of one
    /// process with batch size × ranks.
    /// </summary>
    internal Trainer(LoraModel model, Tokenizer tokenizer, IEnumerable<TrainingExample> examples, LoraConfig? lora,
        TrainConfig? options, string adapterName, string? modelDir, ICollectives? group)
    {
        var c = Copy(options ?? new TrainConfig());
        c.Model = modelDir ?? InMemory;
        c.Data = InMemory;
        c.Validate();
        if (c.Method != "lora") throw new ArgumentException("the in-memory trainer trains LoRA adapters (method lora); full fine-tuning runs through Trainer.Run");
        if (c.InitAdapter is not null) throw new ArgumentException("the in-memory trainer starts a fresh adapter; load one with LoraKitModel.WithAdapter to generate with it");
        var (train, summary) = Tokenize(examples, tokenizer, c);
        if (summary.Format == DataFormat.Classification) throw new ArgumentException("the in-memory trainer trains language modelling (text, prompt/completion, chat); classification runs through Trainer.Run");
        if (c.Packing) train = Batches.Pack(train, c.MaxLength);
        _name = adapterName;
        Init(c, model, tokenizer, train, null, lora ?? LoraConfigFor(c, model), SilentLog.Instance, model.Model.Device, model.Model.DType, group);
        model.SetDisabled(false);
        model.SetActive(adapterName);
    }

    Trainer() { }

    /// <summary>Where an in-memory trainer's data and model paths would be, in messages and adapter files.</summary>
    const string InMemory = "(in memory)";

    /// <summary>Optimizer steps taken so far.</summary>
    public int StepCount { get; private set; }
    /// <summary>Optimizer steps the schedule runs to (options' steps, or its epochs over the examples).</summary>
    public int TotalSteps { get; private set; }
    /// <summary>The mean loss per target token of the last step (NaN before the first).</summary>
    public double LastLoss { get; private set; } = double.NaN;
    /// <summary>The learning rate of the last step.</summary>
    public double LastLr { get; private set; }
    /// <summary>The gradient norm of the last step, before clipping.</summary>
    public double LastGradNorm { get; private set; }
    /// <summary>Input tokens seen so far (all micro-batches of all steps).</summary>
    public long TokensSeen { get; private set; }
    /// <summary>PEFT's print_trainable_parameters line for what is trained.</summary>
    public string TrainableReport { get; private set; } = "";
    /// <summary>The model being trained.</summary>
    public CausalLM Model => _model;

    /// <summary>
    /// Samples consumed so far over all ranks (the data position a checkpoint saves): the next step's global batch
    /// starts at this position of the seeded sample stream.
    /// </summary>
    long Position { get; set; }
    /// <summary>The position in global micro-batches (what checkpoints before multi-GPU training recorded).</summary>
    long Cursor => Position / _shard.GlobalMicroBatch;
    /// <summary>Data epochs completed so far (fractional).</summary>
    double Epoch => (double)Position / _batches.Count;

    /// <summary>
    /// One optimizer step: accumulate the gradient of options' grad_accum micro-batches, clip, step AdamW at the
    /// scheduled learning rate. In a data-parallel group the micro-batches are this rank's share of the global batch,
    /// the loss is normalised by the global batch's target tokens and the gradients are summed over the ranks before
    /// the clip, so every rank takes the same step. Returns the step's mean loss per target token. Throws
    /// <see cref="NonFiniteStepException"/> (nothing applied) when the loss or the gradient norm is not finite.
    /// </summary>
    public double Step()
    {
        _model.train();
        int step = StepCount + 1;
        using var scope = NewDisposeScope();
        // This rank's share of the global batch; alone, the share is all of it (rank 0 of 1).
        var micro = Enumerable.Range(0, _microPerStep).Select(i => _batches.TakeAt(_shard.Start(Position, i), _shard.BatchSize)).ToList();
        // The loss is normalised by the target tokens of the whole global batch (every rank's micro-batches), so the
        // summed gradients equal one process's with the global batch: the all-reduce is a sum, not a mean. Every rank
        // holds all the data, so it counts the other ranks' targets itself: no collective (and no GPU wait) before the forward.
        long targets = _group is null ? micro.Sum(_countOf) : GlobalTargets();
        // A data-parallel step must not wait for ever on a rank that died: the group's watchdog ends the process.
        using var watch = _group?.Watch($"step {step}");
        double lossSum = 0;
        long tokens = 0;
        foreach (var rows in micro)
        {
            using var loss = _backwardOf(rows, 1.0 / Math.Max(1, targets));
            lossSum += loss.item<float>();
            tokens += rows.Sum(r => (long)r.InputIds.Length);
        }
        if (_group is not null)
        {
            _buckets!.ReduceAll(_group.AllReduceSum);
            var sums = _group.SumAcrossRanks(_device, lossSum, tokens);
            (lossSum, tokens) = (sums[0], (long)sums[1]);
        }
        Position += _shard.SamplesPerStep;
        TokensSeen += tokens;
        if (_graphed && _lmStep.Disabled is string why && !_graphWarned)
        {
            _log.Warn($"CUDA graph off for this run, training continues eagerly: {why}");
            _graphWarned = true;
        }
        double gradNorm = _optimizer.ClipGradNorm(_c.MaxGradNorm);
        double stepLoss = lossSum / Math.Max(1, targets);
        if (!double.IsFinite(stepLoss) || !double.IsFinite(gradNorm))
        {
            _optimizer.ZeroGrad(); // a later Step starts clean
            throw new NonFiniteStepException(double.IsFinite(stepLoss) ? $"gradient norm became non-finite at step {step} (loss {stepLoss:G6})" : $"loss became non-finite at step {step}");
        }
        double lr = _c.Lr * LrSchedule.Factor(_c.Schedule, step - 1, _c.WarmupSteps, TotalSteps);
        _optimizer.Step(lr);
        _optimizer.ZeroGrad();
        StepCount = step;
        LastLoss = stepLoss;
        LastLr = lr;
        LastGradNorm = gradNorm;
        return stepLoss;
    }

    /// <summary>The target tokens (samples, for classification) of the global batch of the step at <see cref="Position"/>, over all ranks' shares.</summary>
    long GlobalTargets() =>
        Enumerable.Range(0, _shard.WorldSize).Sum(r => Enumerable.Range(0, _microPerStep)
            .Sum(i => _countOf(_batches.TakeAt((_shard with { Rank = r }).Start(Position, i), _shard.BatchSize))));

    /// <summary>Mean next-token loss per target token over <paramref name="examples"/>, tokenised as the training examples are (no gradient, dropout off).</summary>
    public double Evaluate(IEnumerable<TrainingExample> examples)
    {
        var (samples, _) = Tokenize(examples, _tok, _c);
        return Evaluate(_model, samples, _c.BatchSize, _padId, _device);
    }

    /// <summary>Writes the adapter trained so far to <paramref name="dir"/> in PEFT's format (adapter_config.json + adapter_model.safetensors).</summary>
    public void Save(string dir)
    {
        _model.eval();
        SaveWeights(dir, null);
    }

    /// <summary>Frees the optimizer state and the step's helpers; the model and its adapter stay (they belong to the model's owner).</summary>
    public void Dispose()
    {
        _lmStep?.Dispose();
        _buckets?.Dispose();
        _sideStream?.Dispose();
        _optimizer?.Dispose();
        _classifier?.Dispose();
        _rng?.Dispose();
    }

    /// <summary>Examples as samples, through the same path as a JSONL file's lines.</summary>
    static (List<Sample>, DataSummary) Tokenize(IEnumerable<TrainingExample> examples, Tokenizer tok, TrainConfig c)
    {
        var lines = examples.Select((e, i) => (i + 1, e.ToJsonLine(), (string?)null));
        return JsonlDataset.Read(lines, "example", tok, DataOptionsFor(c));
    }

    static DataOptions DataOptionsFor(TrainConfig c) => new()
    {
        Format = ParseFormat(c.Format), TrainOnAllTokens = c.TrainOnAllTokens, AppendEos = c.Eos, MaxLength = c.MaxLength, SkipBadLines = c.SkipBadLines,
    };

    static TrainConfig Copy(TrainConfig c) =>
        System.Text.Json.JsonSerializer.Deserialize<TrainConfig>(c.ToJson(), new System.Text.Json.JsonSerializerOptions { PropertyNamingPolicy = System.Text.Json.JsonNamingPolicy.SnakeCaseLower })!;

    /// <summary>
    /// Builds what is trained and how one step runs: the adapter (fresh from <paramref name="fresh"/>, or c's init
    /// adapter) or all weights, the kernels and memory placements, the optimizer, the batches and the task's loss.
    /// </summary>
    void Init(TrainConfig c, LoraModel lm, Tokenizer tok, List<Sample> train, IReadOnlyList<string>? labels, LoraConfig? fresh, ITrainLog log, Device device, ScalarType dtype,
        ICollectives? group = null)
    {
        _c = c; _lm = lm; _model = lm.Model; _tok = tok; _log = log; _device = device;
        _group = group is { WorldSize: > 1 } ? group : null;
        int world = _group?.WorldSize ?? 1;
        var model = _model;
        // Everything random in a run comes from the seed through generators of its own (initialisation, the score
        // head, shuffling, dropout), never from torch's global one, which anything else in the process may draw from.
        _rng = new RngStream((ulong)c.Seed);
        var rng = _rng;

        // ---- what is trained ----
        List<(string name, Parameter param)> trainable;
        if (c.Method == "lora")
        {
            if (c.InitAdapter is string init) AdapterFiles.Load(lm, _name, init);
            else lm.AddAdapter(_name, fresh ?? LoraConfigFor(c, lm), c.Seed);
            trainable = lm.Parameters(_name);
        }
        else
        {
            trainable = model.named_parameters().GroupBy(p => p.parameter.Handle).Select(g => g.First()).Select(p => (p.name, p.parameter)).ToList();
            foreach (var (_, p) in trainable) p.requires_grad = true;
        }
        bool fast = FastKernels(c.Kernels, device, dtype);
        lm.UseRng(rng);
        if (fast) log.Info("kernels: fast (LoRA branch in the base dtype, lean RMSNorm/SwiGLU backwards; `kernels` exact for PEFT's fp32 branch)");
        var classifier = labels is null ? null : new SequenceClassifier(model, labels, c.Seed) { PadTokenId = SequenceClassifier.PadFor(tok, model.Config) };
        _classifier = classifier;
        if (classifier != null) trainable.Add(("score.weight", classifier.Score));
        // The one place the fast paths (fused kernels, checkpointing, offload, host embeddings) are swapped into the model.
        foreach (var line in TrainingAccelerator.Apply(lm, Acceleration(c, fast, rng))) log.Info(line);
        _trainable = trainable;
        TrainableReport = c.Method == "lora" ? lm.TrainableReport(_name) + (classifier != null ? $" (+ score head {classifier.Score.numel():N0})" : "")
            : $"trainable params: {trainable.Sum(p => p.param.numel()):N0} || all params: {trainable.Sum(p => p.param.numel()):N0} || trainable%: 100.0000";
        log.Info(TrainableReport);

        _microPerStep = c.GradAccum;
        // A micro-batch larger than the data would be filled by cycling through it again and again (--batch-size 100000
        // on 6 samples ran out of time and memory); like a PyTorch DataLoader, the batch is then the whole data.
        // With N ranks the global micro-batch (N × batch size) is what must fit in the data.
        int batchSize = Math.Max(1, Math.Min(c.BatchSize, train.Count / world));
        if (batchSize < c.BatchSize)
            log.Warn(world == 1 ? $"batch size {c.BatchSize} is more than the {train.Count} training samples; using {batchSize}"
                : $"batch size {c.BatchSize} on each of {world} ranks is more than the {train.Count} training samples; using {batchSize}");
        _shard = new DataShard(_group?.Rank ?? 0, world, batchSize, _microPerStep);
        int stepsPerEpoch = (int)Math.Ceiling((double)train.Count / _shard.SamplesPerStep);
        TotalSteps = c.Steps > 0 ? c.Steps : Math.Max(1, (int)Math.Ceiling(c.Epochs * stepsPerEpoch));
        _batches = new Batches(train, batchSize, c.Shuffle, c.Seed);
        _optimizer = new AdamW(trainable, c.Beta1, c.Beta2, c.AdamEps, c.WeightDecay);
        // Every rank starts from the same weights (same seed or init adapter) and applies the same summed gradients,
        // so the replicas stay identical without broadcasting weights.
        _buckets = _group is null ? null : new GradientBuckets(trainable);
        if (_group is not null) log.Info($"data parallel: rank {_group.Rank} of {world}, global batch {_shard.SamplesPerStep} samples per step " +
                                         $"({batchSize} × {world} ranks × {_microPerStep} accumulation), gradients in {_buckets!.Buckets.Count} bucket(s)");
        int padId = tok.Config.PadToken is string pt && tok.TokenToId(pt) is int pid ? pid : model.Config.PadTokenId ?? 0;
        _padId = padId;
        // The task decides what a micro-batch's summed loss is and what it is normalised by: target tokens for language
        // modelling, samples for classification. backwardOf(rows, 1/count) back-propagates the normalised loss and
        // returns the sum; language modelling may replay it from a CUDA graph.
        // A quantized base is captured when its layers dequantize with the CUDA kernel (constant launch arguments); the
        // reference ops make host scalars every forward, which a graph cannot replay.
        bool ungraphable = model.Quantization is not null && !Runtime.Cuda.DequantKernels.Usable(device);
        if (ungraphable && c.CudaGraph == "on") throw new ArgumentException("`cuda_graph` on: a quantized base is captured only with the CUDA dequantization kernel, which is not available; use auto or off");
        bool graphed = classifier is null && c.Method == "lora" && !ungraphable && UseCudaGraph(c.CudaGraph, device, fast, fresh?.LoraDropout ?? c.LoraDropout);
        _graphed = graphed;
        _sideStream = graphed ? Runtime.Cuda.CudaStreams.UseSideStream(device) : null;
        var lmStep = new GraphedStep(b => LossSum(model, b, chunked: c.Method == "lora"), graphed);
        _lmStep = lmStep;
        _backwardOf = classifier is null
            ? (rows, scale) => { using var b = Batches.Collate(rows, padId, device); return lmStep.Run(b, scale); }
            : (rows, scale) =>
            {
                using var b = Batches.Collate(SequenceClassifier.Inputs(rows), padId, device);
                var loss = classifier.LossSum(b, SequenceClassifier.LabelTensor(rows, device));
                loss.Times(scale).backward();
                return loss.detach();
            };
        if (graphed) log.Info("CUDA graph: the training step is captured after its first batch and replayed for batches of the same shape (`cuda_graph` off to disable)");
        _countOf = classifier is null
            ? rows => rows.Sum(r => (long)r.Labels.Skip(1).Count(l => l != Sample.IgnoreIndex))
            : rows => rows.Count;
    }

    /// <summary>Validation loss (and accuracy for classification) over already tokenised samples.</summary>
    (double loss, double? accuracy) EvaluateSamples(List<Sample> valid)
    {
        if (_classifier is null) return (Evaluate(_model, valid, _c.BatchSize, _padId, _device), null);
        var (l, a) = _classifier.Evaluate(valid, _c.BatchSize, _padId);
        return (l, a);
    }

    /// <summary>
    /// <c>lorakit train</c>, top to bottom: load data and model, build the trainer, then per optimizer step log,
    /// evaluate and checkpoint; finally save the adapter and the report.
    /// </summary>
    /// <param name="resume">continue the run in the output directory from its newest readable checkpoint</param>
    /// <param name="overwrite">replace the run in the output directory (only the files LoraKit wrote are deleted)</param>
    /// <param name="cancel">when signalled, the run saves a checkpoint and the adapter after the current step and throws
    /// <see cref="TrainingInterruptedException"/></param>
    /// <param name="suites">runs the evaluation suites c's <c>eval_suite</c> names, at step 0 and at every evaluation
    /// (see <see cref="IStepEvaluator"/>); required exactly when <c>eval_suite</c> names any</param>
    /// <param name="initAdapterRef">where c's <c>init_adapter</c> came from when it was named rather than given as a folder
    /// (a registry's <c>NAME@VERSION</c>): recorded with the init adapter's content hash in the run (see
    /// <see cref="RunDirectory.InitAdapter"/>) and its report. A resumed run keeps the one it recorded.</param>
    /// <param name="tracker">told when the run starts (its output directory open) and how it ends, also when it throws</param>
    /// <param name="group">the data-parallel group this process is one rank of (null: training alone). Every rank runs
    /// this with the same configuration; rank 0 alone writes the run directory (checkpoints, metrics, best/, the
    /// adapter, the report), evaluates and decides early stopping, and the ranks agree on stopping after every step.
    /// With a group, c's device names this rank's device.</param>
    public static TrainResult Run(TrainConfig c, bool resume, ITrainLog log, bool overwrite = false, CancellationToken cancel = default,
        IStepEvaluator? suites = null, string? initAdapterRef = null, IRunTracker? tracker = null, ICollectives? group = null)
    {
        bool started = false;
        string status = RunEnd.Failed;
        string? error = null;
        try
        {
            var result = RunCore(c, resume, log, overwrite, cancel, suites, initAdapterRef, start => { started = true; tracker?.Started(start); }, group is { WorldSize: > 1 } ? group : null);
            status = result.StoppedEarly ? RunEnd.StoppedEarly : RunEnd.Finished;
            return result;
        }
        catch (TrainingInterruptedException e) { status = RunEnd.Interrupted; error = e.Message; throw; }
        catch (Exception e) { error = e.Message; throw; }
        finally
        {
            if (started) tracker?.Ended(new RunEnd(Path.GetFullPath(c.Output), status, DateTimeOffset.UtcNow, error));
        }
    }

    static TrainResult RunCore(TrainConfig c, bool resume, ITrainLog log, bool overwrite, CancellationToken cancel, IStepEvaluator? suites, string? initAdapterRef, Action<RunStart> onStart,
        ICollectives? group)
    {
        // Rank 0 (or a process alone) owns the run directory; the other ranks read the checkpoint they resume from and write nothing.
        bool lead = group is null || group.Rank == 0;
        c.Validate();
        if (c.EvalSuite.Count > 0 && suites is null)
            throw new ArgumentException($"`eval_suite` names {string.Join(", ", c.EvalSuite)} but no evaluator was given to run the suites ({nameof(IStepEvaluator)})");
        if (c.EvalSuite.Count == 0 && suites is not null)
            throw new ArgumentException($"an evaluator ({nameof(IStepEvaluator)}) was given but `eval_suite` names no evaluation suite: the run's configuration must record what it measures");
        var wall = Stopwatch.StartNew();
        var startedAt = DateTimeOffset.UtcNow;
        var (device, dtype) = Placement.Resolve(c.Device, c.Dtype);
        // Everything random in a run comes from the seed through generators of its own (initialisation, the score
        // head, shuffling, dropout), never from torch's global one, which anything else in the process may draw from.
        if (resume && overwrite) throw new LoraKitException("resume and overwrite exclude each other: resume continues the run, overwrite starts it again");
        var run = lead ? RunDirectory.Open(c.Output, c.Identity(), resume, overwrite, DescribeRun) : null;
        string deviceName = DeviceInfo.Name(device), dtypeName = DeviceInfo.DTypeName(dtype);
        string? gpuName = DeviceInfo.GpuName(device);
        if (group is not null) deviceName = $"{deviceName} × {group.WorldSize} ranks";
        if (run is not null) onStart(new RunStart(run.Root, Path.GetFileName(run.Root), c.ToJsonObject(), c.Model, FingerprintOrNull(c.Model), startedAt,
            $"{deviceName}{(gpuName is null ? "" : $" ({gpuName})")}, {dtypeName}", resume));

        // ---- data ----
        var tok = Tokenizer.Load(c.Model);
        var opts = DataOptionsFor(c);
        var labels = JsonlDataset.ClassificationLabels(c.Data);
        var (train, trainSummary) = JsonlDataset.Load(c.Data, tok, opts, labels);
        trainSummary = WithDigest(trainSummary);
        bool classify = trainSummary.Format == DataFormat.Classification;
        if (classify && labels!.Count < 2)
            throw new DataException($"{c.Data}: classification needs at least two labels, but every line has {(labels.Count == 1 ? $"label '{labels[0]}'" : "no usable label")}");
        if (classify && (c.Method != "lora" || c.Packing)) throw new ArgumentException("classification data trains a LoRA adapter with a score head; `method` full and `packing` do not apply");
        if (!classify && c.Metric == "eval_accuracy") throw new ArgumentException("`metric` eval_accuracy needs classification data ({\"text\", \"label\"})");
        // The suites' cases run through the language model; a classification run's score head is not part of it.
        if (classify && suites is not null) throw new ArgumentException("`eval_suite` during training needs language-modelling data (text, prompt/completion, chat); evaluate a classification adapter once it is trained");
        List<Sample>? valid = null;
        DataSummary? validSummary = null;
        if (c.ValidationData is string vpath)
        {
            (valid, validSummary) = JsonlDataset.Load(vpath, tok, opts, labels);
            validSummary = WithDigest(validSummary);
        }
        else if (c.ValidationFraction > 0)
        {
            var order = Enumerable.Range(0, train.Count).ToArray();
            new Random(c.Seed).Shuffle(order);
            int n = Math.Max(1, (int)Math.Round(train.Count * c.ValidationFraction));
            if (n >= train.Count) throw new ArgumentException("validation fraction leaves no training samples");
            valid = order.Take(n).Select(i => train[i]).ToList();
            var held = order.Take(n).ToHashSet();
            train = train.Where((_, i) => !held.Contains(i)).ToList();
        }
        foreach (var p in trainSummary.Problems.Take(5)) log.Warn($"skipped {p}");
        if (trainSummary.Skipped > 0) log.Warn($"skipped {trainSummary.Skipped} bad line(s) in {c.Data}");
        if (classify) log.Info($"classification with {labels!.Count} labels: {string.Join(", ", labels)}");
        log.Info($"data: {train.Count} training samples ({trainSummary.Format}), {trainSummary.Tokens:N0} tokens, {trainSummary.TargetTokens:N0} trained" +
                 (valid is null ? "" : $"; {valid.Count} validation samples") + (trainSummary.Truncated > 0 ? $"; {trainSummary.Truncated} truncated to {c.MaxLength}" : ""));

        if (c.InitAdapter is string initDir && run is not null) run.InitAdapter = InitAdapterRecord(initDir, initAdapterRef, run.InitAdapter);
        var model = CausalLM.Load(c.Model, dtype, device, c.QuantizeOptions());
        if (model.Quantization is not null && c.Method != "lora")
            throw new ArgumentException($"{c.Model} is a quantized base (packed weights); method full needs dense weights, train a LoRA adapter instead");
        if (model.Quantization is { } q) log.Info($"base quantized: {QuantizedBase.Describe(q)}, computing in {q.ComputeDtype} (reference dequantization per layer)");
        CheckStopToken(c, tok, model, train, trainSummary.Format, log);
        if (c.Packing) train = Batches.Pack(train, c.MaxLength);

        var lm = new LoraModel(model);
        using var t = new Trainer();
        t.Init(c, lm, tok, train, classify ? labels : null, null, log, device, dtype, group);
        int totalSteps = t.TotalSteps;
        string report = t.TrainableReport;
        int evalEvery = valid is null && suites is null ? 0 : c.EvalEvery > 0 ? c.EvalEvery : Math.Max(1, totalSteps / 10);
        // Without validation data an evaluation measures the suites only: eval_loss and eval_accuracy have nothing to
        // follow (no best checkpoint, no early stopping by them, as in a run without evaluations).
        bool tracked = valid is not null || TrainConfig.SuiteMetrics.Contains(c.Metric);
        string? adapterName = c.Method == "lora" ? t._name : null;
        int saveEvery = c.SaveEvery > 0 ? c.SaveEvery : evalEvery > 0 ? evalEvery : Math.Max(1, totalSteps / 5);

        // ---- fresh start or resume ----
        string configHash = TrainConfig.Hash(c.Identity().ToJsonString());
        string dataHash = DataHash(c);
        var state = new TrainState { ConfigHash = configHash, DataHash = dataHash, Config = c.Identity(), TotalSteps = totalSteps };
        string weightsFile = c.Method == "lora" ? AdapterFiles.WeightsFile : "model.safetensors";
        var finalDir = Path.Combine(c.Output, c.Method == "lora" ? "adapter" : "model");
        if (resume)
        {
            var (ckpt, saved) = Checkpoints.LatestReadable(c.Output, weightsFile, log.Warn)
                ?? throw new LoraKitException($"{Checkpoints.Root(c.Output)}: no complete, readable checkpoint to resume from");
            if (Differences(saved.Config, c.Identity()) is string diffs) throw new LoraKitException($"cannot resume {c.Output}: the configuration differs from the checkpoint's: {diffs}");
            if (saved.DataHash != dataHash) throw new LoraKitException($"cannot resume {c.Output}: the training or validation data differ from the checkpoint's (content hash changed)");
            if (saved.Finished && (saved.StoppedEarly || totalSteps <= saved.Step))
            {
                log.Info($"the run in {c.Output} is already complete (step {saved.Step} of {saved.TotalSteps}{(saved.StoppedEarly ? ", stopped early" : "")}); " +
                         $"its result is in {finalDir}; nothing to do (to train longer, resume with more steps)");
                lm.Dispose();
                var bestSoFar = BestOf(saved);
                return new TrainResult(c.Output, finalDir, saved.Step, saved.LastLoss ?? double.NaN, bestSoFar, null, report, trainSummary, validSummary, wall.Elapsed.TotalSeconds, saved.StoppedEarly);
            }
            if (totalSteps < saved.Step) throw new LoraKitException($"cannot resume {c.Output} with {totalSteps} steps: it is already at step {saved.Step}");
            state = saved with { TotalSteps = totalSteps, Finished = false, Config = c.Identity(), ConfigHash = configHash };
            t.Restore(ckpt, state);
            log.Info($"resumed from {ckpt} (step {state.Step} of {totalSteps})");
        }

        var metricsPath = Path.Combine(c.Output, "metrics.jsonl");
        using var metrics = lead ? new MetricsLog(metricsPath, resume ? state.Step : 0) : null;
        run?.Record(metricsPath);
        var board = lead && c.ReportTo == "tensorboard" ? new TensorBoardLog(c.Output) : null;
        if (board is not null) run?.Record(board.Dir); // its events file exists from here on: a replaced run deletes it
        EvalMetrics? best = BestOf(state);
        EvalMetrics? lastEval = null;
        int badEvals = state.EvalsWithoutImprovement;
        bool stoppedEarly = false;
        var clock = Stopwatch.StartNew();
        long tokensAtStart = t.TokensSeen;
        int delayMs = int.TryParse(Environment.GetEnvironmentVariable("LORAKIT_TEST_STEP_DELAY_MS"), out int dm) ? dm : 0; // kill-and-resume test

        if (lead && suites is not null && t.StepCount == 0)
        {
            // Step 0, before any update: with a fresh adapter (B = 0) this is the base model, the reference every later
            // evaluation is read against. Not a candidate for best/ (that is an adapter the run trained).
            var before = new EvalMetrics(0, double.NaN, double.NaN, false) { Validated = false, Suites = RunSuites(suites, lm, adapterName, 0, c.Metric) };
            metrics?.Eval(before);
            board?.Eval(before);
            log.Eval(before);
        }

        model.train();
        int step = t.StepCount;
        while (step < totalSteps)
        {
            try { t.Step(); }
            catch (NonFiniteStepException e)
            {
                // Nothing of this step is applied or saved: the checkpoints and adapter already written stay as they are.
                string kept = Checkpoints.Latest(c.Output) is string good ? $"the last good checkpoint is {good}" : "no checkpoint had been written yet";
                throw new LoraKitException($"{e.Message}; training stopped and these weights were not saved; {kept} (a lower learning rate or gradient clipping may help)");
            }
            step = t.StepCount;
            if (step % c.LogEvery == 0 || step == totalSteps)
            {
                double secs = clock.Elapsed.TotalSeconds;
                var m = new StepMetrics(step, totalSteps, t.Epoch, t.LastLoss, t.LastLr, t.LastGradNorm, t.TokensSeen,
                    (t.TokensSeen - tokensAtStart) / Math.Max(secs, 1e-9), wall.Elapsed.TotalSeconds);
                metrics?.Step(m);
                board?.Step(m);
                log.Step(m);
            }

            bool evalNow = lead && evalEvery > 0 && (step % evalEvery == 0 || step == totalSteps);
            if (evalNow)
            {
                var (vl, acc) = valid is null ? (double.NaN, null) : t.EvaluateSamples(valid);
                var candidate = new EvalMetrics(step, vl, Math.Exp(vl), false, acc)
                {
                    Validated = valid is not null, Suites = suites is null ? null : RunSuites(suites, lm, adapterName, step, c.Metric),
                };
                bool improved = tracked && double.IsFinite(candidate.Key(c.Metric)) && (best is null || candidate.Key(c.Metric) < best.Key(c.Metric));
                lastEval = candidate with { IsBest = improved };
                if (improved) { best = lastEval; badEvals = 0; t.SaveWeights(Path.Combine(c.Output, "best"), run!); }
                else if (tracked) badEvals++;
                metrics?.Eval(lastEval);
                board?.Eval(lastEval);
                log.Eval(lastEval);
                if (c.EarlyStoppingPatience > 0 && badEvals >= c.EarlyStoppingPatience)
                {
                    log.Info($"early stopping: {c.Metric} has not improved for {badEvals} evaluations (best at step {best!.Step})");
                    stoppedEarly = true;
                }
            }
            bool interrupted = cancel.IsCancellationRequested;
            if (group is not null)
            {
                // Rank 0 decides early stopping; a signal may reach the ranks a step apart: all stop at the same step.
                using (group.Watch($"step {step}: agreeing whether to stop"))
                {
                    var votes = group.SumAcrossRanks(device, stoppedEarly ? 1 : 0, interrupted ? 1 : 0);
                    (stoppedEarly, interrupted) = (votes[0] > 0, votes[1] > 0);
                }
            }
            string? savedCheckpoint = null;
            if (lead && (step % saveEvery == 0 || step == totalSteps || stoppedEarly || interrupted))
            {
                var st = state with
                {
                    Step = step, Cursor = t.Cursor, SamplesSeen = t.Position, OptimizerSteps = t._optimizer.StepCount, RngState = Checkpoints.EncodeRng(t._rng),
                    BestEvalLoss = best is { Validated: true } ? Finite(best.Loss) : null, BestStep = best?.Step, BestAccuracy = Finite(best?.Accuracy),
                    BestSuites = best?.Suites?.Where(kv => double.IsFinite(kv.Value)).ToDictionary(), EvalsWithoutImprovement = badEvals, TokensSeen = t.TokensSeen,
                    Finished = step == totalSteps || stoppedEarly, StoppedEarly = stoppedEarly, LastLoss = Finite(t.LastLoss),
                };
                try { savedCheckpoint = Checkpoints.Save(c.Output, st, dir => t.SaveWeights(dir, null, checkpoint: true), t._optimizer, run!); }
                catch (WeightValueException e)
                {
                    // The loss can stay finite for a step while the weights have already blown up (a huge learning rate).
                    string kept = Checkpoints.Latest(c.Output) is string good ? $"the last good checkpoint is {good}" : "no checkpoint had been written yet";
                    throw new LoraKitException($"the LoRA weights diverged at step {step} ({e.Message}); training stopped and these weights were not saved; " +
                                               $"{kept} (a lower learning rate or gradient clipping may help)");
                }
                Checkpoints.Prune(c.Output, keep: 2, protect: null, run!);
            }
            if (interrupted && step < totalSteps && !stoppedEarly)
            {
                model.eval();
                if (lead) t.SaveWeights(finalDir, run);
                // The other ranks wait for rank 0's files before they end, so a launcher that stops the group when one
                // rank exits cannot cut the checkpoint short.
                if (group is not null) using (group.Watch($"step {step}: saving on interrupt")) group.SumAcrossRanks(device, 0);
                lm.Dispose();
                throw new TrainingInterruptedException(step, totalSteps, savedCheckpoint ?? Checkpoints.Latest(c.Output) ?? "(rank 0's)", finalDir);
            }
            if (delayMs > 0) Thread.Sleep(delayMs);
            if (stoppedEarly) break;
        }

        if (t._graphed && t._lmStep.Disabled is null) log.Info($"CUDA graph: {t._lmStep.Replays} micro-batches replayed (the others ran eagerly: the first, and any of another shape)");
        if (Runtime.Cuda.CudaMemoryStats.Read(device) is { } mem)
            log.Info($"peak GPU memory: {Runtime.Cuda.CudaMemory.Gib(mem.PeakAllocated):F2} GiB allocated, {Runtime.Cuda.CudaMemory.Gib(mem.PeakReserved):F2} GiB reserved by libtorch's allocator (since the start, model load included)");
        model.eval();
        var adapterDir = finalDir;
        if (!lead)
        {
            // Rank 0 writes the result and the report; this rank's copy of the weights is the same.
            var rankStats = new RunStats(startedAt, DateTimeOffset.UtcNow, deviceName, gpuName, dtypeName, t.TokensSeen,
                (t.TokensSeen - tokensAtStart) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9), null, null);
            lm.Dispose();
            return new TrainResult(c.Output, adapterDir, step, t.LastLoss, best, lastEval, report, trainSummary, validSummary, wall.Elapsed.TotalSeconds, stoppedEarly)
                { Stats = rankStats };
        }
        if (run is null) throw new InvalidOperationException("rank 0 holds the run directory");
        string what = c.Method == "lora" ? "adapter" : "model";
        var bestDir = Path.Combine(c.Output, "best");
        if (best is not null && Directory.Exists(bestDir))
        {
            // As transformers' load_best_model_at_end: the result is the best by the metric; the last step's is kept beside it.
            var lastDir = Path.Combine(c.Output, "last");
            t.SaveWeights(lastDir, run);
            run.Clear(adapterDir);
            CopyInto(bestDir, adapterDir, run);
            log.Info($"{adapterDir} is the best {what} by {c.Metric} (step {best.Step} of {step}, {c.Metric} {best.Value(c.Metric):G6}); " +
                     $"the last step's {what} is in {lastDir}");
        }
        else t.SaveWeights(adapterDir, run);
        var peak = DeviceInfo.PeakMemory(device);
        var stats = new RunStats(startedAt, DateTimeOffset.UtcNow, deviceName, gpuName, dtypeName, t.TokensSeen,
            (t.TokensSeen - tokensAtStart) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9), peak?.Gib, peak?.Kind);
        var result = new TrainResult(c.Output, adapterDir, step, t.LastLoss, best, lastEval, report, trainSummary, validSummary, wall.Elapsed.TotalSeconds, stoppedEarly)
            { Stats = stats };
        TrainReport.Write(c, result, metricsPath, run.InitAdapter);
        foreach (var f in new[] { "report.json", "report.html", "loss.png", TrainReport.SuitesPlot }) run.Record(Path.Combine(c.Output, f));
        lm.Dispose();
        log.Info($"saved {what} to {adapterDir}; report in {Path.Combine(c.Output, "report.html")}");
        return result;
    }

    /// <summary>The data file's summary with its sha256 and size (hashed as read: a data file may be many gigabytes).</summary>
    static DataSummary WithDigest(DataSummary s)
    {
        var (sha, bytes) = FileDigest.Of(s.Path);
        return s with { Sha256 = sha, Bytes = bytes };
    }

    /// <summary>
    /// What the run records about the adapter it started from: its folder, content hash (<see cref="AdapterDigest"/>) and,
    /// when it was named, the name (<paramref name="reference"/>). A resumed run given no name keeps the one it recorded
    /// for the same content.
    /// </summary>
    static JsonObject InitAdapterRecord(string dir, string? reference, JsonObject? recorded)
    {
        string sha = AdapterDigest.Compute(dir);
        reference ??= recorded?["sha256"]?.GetValue<string>() == sha ? recorded["ref"]?.GetValue<string>() : null;
        return new JsonObject { ["path"] = Path.GetFullPath(dir), ["sha256"] = sha, ["ref"] = reference };
    }

    /// <summary>Continues from a checkpoint: its weights, optimizer moments, dropout stream and data position.</summary>
    void Restore(string ckpt, TrainState state)
    {
        RestoreWeights(ckpt, _c, _trainable);
        Checkpoints.RestoreOptimizer(ckpt, _optimizer, state.OptimizerSteps);
        Checkpoints.RestoreRng(state.RngState, _rng);
        StepCount = state.Step;
        // Counted in global samples, the position carries over to another number of ranks; older checkpoints counted
        // micro-batches of one process.
        Position = state.SamplesSeen ?? state.Cursor * _shard.BatchSize;
        TokensSeen = state.TokensSeen;
        LastLoss = state.LastLoss ?? double.NaN;
    }

    /// <summary>The base's fingerprint for the run's record; a model directory it cannot be read from fails later, with its own message.</summary>
    static string? FingerprintOrNull(string modelDir)
    {
        try { return BaseFingerprint.Of(modelDir); }
        catch (Exception e) when (e is LoraKitException or IOException or UnauthorizedAccessException or System.Text.Json.JsonException or ArgumentException) { return null; }
    }

    static double? Finite(double? x) => x is double v && double.IsFinite(v) ? v : null;

    /// <summary>The best evaluation a checkpoint recorded, or null: by validation loss (older runs) and/or by the suites' metrics.</summary>
    static EvalMetrics? BestOf(TrainState s)
    {
        if (s.BestEvalLoss is null && s.BestSuites is null) return null;
        double loss = s.BestEvalLoss ?? double.NaN;
        return new EvalMetrics(s.BestStep ?? 0, loss, Math.Exp(loss), true, s.BestAccuracy) { Validated = s.BestEvalLoss is not null, Suites = s.BestSuites };
    }

    /// <summary>
    /// The suites' metrics at <paramref name="step"/>, under <see cref="IStepEvaluator"/>'s contract: eval mode, no
    /// gradient, a dispose scope; train mode again after. Checks what comes back: suite: names, and the metric the run
    /// follows among them.
    /// </summary>
    static IReadOnlyDictionary<string, double> RunSuites(IStepEvaluator suites, LoraModel lm, string? adapterName, int step, string metric)
    {
        IReadOnlyDictionary<string, double> result;
        lm.Model.eval();
        try
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            result = suites.Evaluate(lm, adapterName, step);
        }
        finally { lm.Model.train(); }
        if (result.Keys.FirstOrDefault(k => !k.StartsWith("suite:", StringComparison.Ordinal)) is string bad)
            throw new InvalidOperationException($"{suites.GetType().Name} reported '{bad}': evaluation suite metrics are named suite:…");
        if (TrainConfig.SuiteMetrics.Contains(metric) && !result.ContainsKey(metric))
            throw new LoraKitException($"`metric` {metric}: the evaluation suites report no such metric at step {step} " +
                                       $"(they report {(result.Count == 0 ? "none" : string.Join(", ", result.Keys))}); do they have cases of that kind?");
        return result.ToDictionary();
    }

    /// <summary>Copies the files of one output subdirectory into another (the best adapter into adapter/), recording them as the run's.</summary>
    static void CopyInto(string from, string to, RunDirectory run)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from))
            if (run.IsOurs(f)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)), overwrite: true);
        run.Record(to);
    }

    /// <summary>What an existing run directory holds, for the message that refuses to write over it.</summary>
    static string? DescribeRun(string output)
    {
        try { return Checkpoints.Latest(output) is string l ? $"checkpoint {Path.GetFileName(l)}" : null; }
        catch (IOException) { return null; }
    }

    static DataFormat ParseFormat(string f) => f.ToLowerInvariant() switch
    {
        "auto" => DataFormat.Auto,
        "text" => DataFormat.Text,
        "prompt-completion" or "prompt_completion" or "completion" => DataFormat.PromptCompletion,
        "chat" or "messages" => DataFormat.Chat,
        _ => throw new ArgumentException($"unknown data format '{f}' (auto, text, prompt-completion, chat)"),
    };

    /// <summary>
    /// The fresh adapter a run trains. With <paramref name="lm"/>, the default targets become that model's projection
    /// names (the same seven on the Llama family; qkv_proj, o_proj, gate_up_proj, down_proj on Phi-3).
    /// </summary>
    public static LoraConfig LoraConfigFor(TrainConfig c, LoraModel? lm = null) => new()
    {
        R = c.R, LoraAlpha = c.LoraAlpha, LoraDropout = c.LoraDropout,
        TargetModules = c.TargetModules.Count == 1 && c.TargetModules[0] == LoraConfig.AllLinear ? null
            : lm is not null && c.TargetModules.SequenceEqual(TrainConfig.DefaultTargetModules) ? [.. lm.ProjectionNames()] : c.TargetModules,
        TargetRegex = c.TargetModules.Count == 1 && c.TargetModules[0] == LoraConfig.AllLinear ? LoraConfig.AllLinear : null,
        UseRslora = c.UseRslora, UseDora = c.UseDora, BaseModelNameOrPath = c.Model,
    };

    /// <summary>The --kernels rule: fast when asked, or for auto on CUDA with a bf16/fp16 base.</summary>
    public static bool FastKernels(string kernels, Device device, ScalarType dtype) =>
        kernels == "fast" || (kernels == "auto" && device.type == TorchSharp.DeviceType.CUDA && dtype != ScalarType.Float32);

    /// <summary>
    /// The --cuda-graph rule: capture the training step as a CUDA graph (<see cref="GraphedStep"/>) when asked, or for
    /// auto on the CUDA fast path without dropout (a replay would reuse one dropout mask).
    /// </summary>
    public static bool UseCudaGraph(string mode, Device device, bool fastKernels, double dropout)
    {
        bool possible = device.type == TorchSharp.DeviceType.CUDA && Runtime.Cuda.CudaStreams.Available;
        switch (mode)
        {
            case "off": return false;
            case "auto": return possible && fastKernels && dropout == 0;
            case "on":
                if (!possible) throw new ArgumentException("`cuda_graph` on needs CUDA and a libtorch that exports its stream API (PyTorch 2.4+)");
                if (dropout > 0) throw new ArgumentException("`cuda_graph` on needs `lora_dropout` 0: a replayed graph would reuse one dropout mask");
                return true;
            default: throw new ArgumentException($"`cuda_graph` must be auto, on or off, not '{mode}'");
        }
    }

    /// <summary>The fast paths a run asks for (see <see cref="TrainingAccelerator"/>).</summary>
    public static TrainingAcceleration Acceleration(TrainConfig c, bool fastKernels, RngStream? rng) => new()
    {
        FusedKernels = fastKernels, GradientCheckpointing = c.GradientCheckpointing, CheckpointKeepBytes = (long)(c.CheckpointKeepGib * (1L << 30)),
        EmbeddingsOnHost = c.EmbeddingsOnHost, OffloadCheckpoints = c.OffloadCheckpoints, OffloadMlpLayers = c.OffloadMlpLayers, Rng = rng,
    };

    /// <summary>
    /// Summed next-token cross-entropy over the batch's target positions (fp32 logits). With <paramref name="chunked"/>
    /// (a frozen LM head, logits not soft-capped) the logits are never kept for backward: see <see cref="ChunkedLmLoss"/>.
    /// </summary>
    public static Tensor LossSum(CausalLM model, Batch b, bool chunked = false)
    {
        using var scope = NewDisposeScope();
        // Rows are right-padded: under causal attention no labelled position sees padding, so unless rows are packed
        // plain causal attention (SDPA's fastest kernel, no mask tensor) is exact for everything the loss reads.
        var mask = b.Segments is null ? null : b.AttentionMask;
        // The chunked loss computes plain logits; soft-capped ones (Gemma 2) take the reference path.
        if (chunked && model.Config.FinalLogitSoftcap is null)
        {
            var h = model.model.Forward(b.InputIds, mask, null, b.Positions, b.Segments);
            long len = h.shape[1];
            var hs = h[.., ..(int)(len - 1)].reshape(-1, h.shape[2]);
            var ts = b.Labels[.., 1..].reshape(-1);
            Runtime.Cuda.MemoryTrace.Mark("final norm", h.device);
            return ChunkedLmLoss.Compute(hs, model.lm_head.weight, ts).MoveToOuterDisposeScope();
        }
        var logits = model.Logits(b.InputIds, mask, null, b.Positions, b.Segments);
        long t = logits.shape[1];
        var pred = logits[.., ..(int)(t - 1)].to(ScalarType.Float32).reshape(-1, logits.shape[2]);
        var target = b.Labels[.., 1..].reshape(-1);
        var loss = nn.functional.cross_entropy(pred, target, ignore_index: Sample.IgnoreIndex, reduction: nn.Reduction.Sum);
        return loss.MoveToOuterDisposeScope();
    }

    public static double Evaluate(CausalLM model, List<Sample> samples, int batchSize, int padId, Device device)
    {
        model.eval();
        using var _ = no_grad();
        double sum = 0;
        long count = 0;
        for (int i = 0; i < samples.Count; i += batchSize)
        {
            using var scope = NewDisposeScope();
            using var batch = Batches.Collate(samples.Skip(i).Take(batchSize).ToList(), padId, device);
            sum += LossSum(model, batch).item<float>();
            count += batch.TargetTokens;
        }
        model.train();
        return sum / Math.Max(1, count);
    }

    /// <summary>
    /// Writes what was trained into <paramref name="dir"/> (replacing it): a PEFT adapter (plus the classification head)
    /// for LoRA; for full fine-tuning a raw tensor file inside checkpoints and an HF checkpoint as the final output.
    /// </summary>
    void SaveWeights(string dir, RunDirectory? run, bool checkpoint = false)
    {
        if (!checkpoint) run?.Clear(dir); // only what LoraKit wrote there: a file the user put beside it stays
        if (_c.Method == "lora")
        {
            AdapterFiles.Save(_lm, _name, dir, _c.Model == InMemory ? null : _c.Model);
            _classifier?.SaveInto(dir);
        }
        else if (checkpoint)
            SafetensorsWriter.Save(Path.Combine(dir, "model.safetensors"), _trainable.ToDictionary(p => p.name, p => (Tensor)p.param));
        else
            CheckpointWriter.Save(_model, _c.Model, dir);
        if (!checkpoint) run?.Record(dir);
    }

    static void RestoreWeights(string ckpt, TrainConfig c, List<(string name, Parameter param)> trainable)
    {
        using var _ = no_grad();
        string file = c.Method == "lora" ? Path.Combine(ckpt, AdapterFiles.WeightsFile) : Path.Combine(ckpt, "model.safetensors");
        using var f = SafetensorsFile.Open(file);
        foreach (var (name, p) in trainable)
        {
            string key = c.Method == "lora" ? "base_model.model." + name : name;
            if (!f.Entries.ContainsKey(key)) throw new LoraKitException($"{file}: checkpoint lacks '{key}'");
            using var t = f.Read(key);
            p.copy_(t);
        }
    }

    static string DataHash(TrainConfig c)
    {
        using var sha = SHA256.Create();
        foreach (var path in new[] { c.Data, c.ValidationData }.OfType<string>())
        {
            var bytes = File.ReadAllBytes(path);
            sha.TransformBlock(bytes, 0, bytes.Length, null, 0);
        }
        sha.TransformFinalBlock([], 0, 0);
        return Convert.ToHexString(sha.Hash!)[..16].ToLowerInvariant();
    }

    /// <summary>What differs between a checkpoint's configuration and this run's, or null; the length of the run (steps,
    /// epochs) may change, so a finished run can be extended.</summary>
    static string? Differences(JsonObject saved, JsonObject now)
    {
        string[] extendable = ["steps", "epochs"];
        var keys = saved.Select(kv => kv.Key).Union(now.Select(kv => kv.Key)).Where(k => !extendable.Contains(k));
        var diffs = keys.Where(k => saved[k]?.ToJsonString() != now[k]?.ToJsonString())
            .Select(k => $"{k}: {saved[k]?.ToJsonString() ?? "unset"} → {now[k]?.ToJsonString() ?? "unset"}").ToList();
        return diffs.Count == 0 ? null : string.Join("; ", diffs);
    }

    /// <summary>
    /// The commonest reason a fine-tuned chat model never stops: the token that ends an assistant turn is not trained,
    /// or is not one of generation_config's eos ids. Checked on the data before training, with a clear warning.
    /// </summary>
    static void CheckStopToken(TrainConfig c, Tokenizer tok, CausalLM model, List<Sample> train, DataFormat format, ITrainLog log)
    {
        if (format is not (DataFormat.Chat or DataFormat.PromptCompletion or DataFormat.Text)) return;
        if (format != DataFormat.Chat && !c.Eos) return;
        // generation_config's ids only (no tokenizer EOS): transformers' generate, where an exported adapter often runs, stops on those.
        var stops = Generation.StopTokens.EosTokenIds(model.Config, null, c.Model).ToHashSet();
        bool trainedStop = train.Any(s => s.Labels.Skip(1).Any(stops.Contains));
        if (trainedStop) return;
        // Which token ends the trained spans? The last special token in them (e.g. <|im_end|>), else the last token.
        var enders = train.Select(s =>
            {
                var trained = s.Labels.Where(l => l != Sample.IgnoreIndex).ToList();
                return trained.LastOrDefault(tok.IsSpecial, trained.LastOrDefault(-1));
            }).Where(x => x >= 0)
            .GroupBy(x => x).OrderByDescending(g => g.Count()).Select(g => g.Key).FirstOrDefault(-1);
        string ender = enders >= 0 ? $"'{tok.IdToToken(enders)}' (id {enders})" : "none";
        log.Warn($"no trained label is a stop token of the model's generation config (eos ids: [{string.Join(", ", stops)}]); " +
                 $"trained spans end with {ender}. The fine-tuned model may never stop generating: add that id to eos_token_id in " +
                 "generation_config.json, or check the chat template / the `eos` setting.");
    }
}
