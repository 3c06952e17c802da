using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace LoraKit.Training;

/// <summary>
/// Everything a training run depends on. File keys are the snake_case property names (lr, batch_size, …); the same
/// names as CLI flags (--lr, --batch-size) override the file. Defaults are the common LoRA recipe.
/// Messages about a setting (here, in the trainer and in the data reader) name it by its key in backquotes
/// (<c>`cuda_graph`</c>, and <c>`resume`</c>/<c>`overwrite`</c> for <see cref="Trainer.Run"/>'s arguments), never by a
/// front end's spelling: the CLI maps those names to its flags.
/// </summary>
public sealed class TrainConfig
{
    // what to train
    public string Model { get; set; } = "";
    public string Data { get; set; } = "";
    public string? ValidationData { get; set; }
    /// <summary>Fraction of the training file held out for validation when no validation file is given.</summary>
    public double ValidationFraction { get; set; }
    public string Output { get; set; } = "out/run";
    /// <summary>lora (default) or full (all weights, for comparison).</summary>
    public string Method { get; set; } = "lora";
    /// <summary>Start from an existing PEFT adapter instead of a fresh one.</summary>
    public string? InitAdapter { get; set; }

    // LoRA
    public int R { get; set; } = 8;
    public double LoraAlpha { get; set; } = 16;
    public double LoraDropout { get; set; } = 0.05;
    /// <summary>
    /// Module names (or all-linear). The default, <see cref="DefaultTargetModules"/>, names every projection of a
    /// Llama-family block; on a model whose blocks name them otherwise (Phi-3's qkv_proj and gate_up_proj) it means that
    /// model's projections (<see cref="Lora.LoraModel.ProjectionNames"/>), as PEFT's Phi-3 adapters target them.
    /// </summary>
    public List<string> TargetModules { get; set; } = [.. DefaultTargetModules];

    /// <summary>The default <see cref="TargetModules"/>: every linear layer of a Llama-family block.</summary>
    public static readonly IReadOnlyList<string> DefaultTargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    public bool UseRslora { get; set; }
    /// <summary>DoRA (PEFT's <c>use_dora</c>): a trainable magnitude per output row beside the low-rank update.</summary>
    public bool UseDora { get; set; }

    // quantized base (QLoRA)
    /// <summary>nf4, fp4 or int8: quantize the frozen base's linear layers on load and keep them packed (null: as stored).</summary>
    public string? Quantize { get; set; }
    /// <summary>on or off: double-quantize the 4-bit absmax (bnb_4bit_use_double_quant).</summary>
    public string DoubleQuant { get; set; } = "on";
    /// <summary>Values per 4-bit absmax block.</summary>
    public int QuantBlocksize { get; set; } = 64;

    /// <summary>The quantize-on-load options these settings ask for (null: none); the compute dtype is the load's.</summary>
    public Quantization.BnbQuantizeOptions? QuantizeOptions() =>
        Quantize is null ? null : new Quantization.BnbQuantizeOptions(Quantize, DoubleQuant == "on", QuantBlocksize);

    // data
    public string Format { get; set; } = "auto";
    public int MaxLength { get; set; } = 1024;
    public bool Packing { get; set; }
    public bool Shuffle { get; set; } = true;
    public bool Eos { get; set; } = true;
    public bool TrainOnAllTokens { get; set; }
    public bool SkipBadLines { get; set; }

    // optimisation
    public double Lr { get; set; } = 2e-4;
    public string Schedule { get; set; } = "cosine";
    public int WarmupSteps { get; set; }
    public double WeightDecay { get; set; }
    public double Beta1 { get; set; } = 0.9;
    public double Beta2 { get; set; } = 0.999;
    public double AdamEps { get; set; } = 1e-8;
    public double MaxGradNorm { get; set; } = 1.0;
    public int BatchSize { get; set; } = 4;
    public int GradAccum { get; set; } = 1;
    /// <summary>Optimizer steps; 0 means one pass over the data (times <see cref="Epochs"/>).</summary>
    public int Steps { get; set; }
    public double Epochs { get; set; } = 1;
    public bool GradientCheckpointing { get; set; }
    /// <summary>
    /// With checkpointing on the fast path: GiB of device memory the layers may spend keeping their gate/up outputs, so
    /// that the replay in backward skips those GEMMs (see <see cref="Accelerated.LayerStash"/>). 0 keeps the least memory.
    /// </summary>
    public double CheckpointKeepGib { get; set; } = DefaultCheckpointKeepGib;
    public const double DefaultCheckpointKeepGib = 2;
    /// <summary>auto, on or off: keep an untied input embedding in host memory (see <see cref="Accelerated.TrainingAccelerator.PlaceEmbeddings"/>); auto with checkpointing on CUDA.</summary>
    public string EmbeddingsOnHost { get; set; } = "auto";
    /// <summary>auto, on or off: layer checkpoints wait for backward in host memory (see <see cref="Accelerated.TrainingAccelerator.PlaceCheckpoints"/>); auto with checkpointing on CUDA.</summary>
    public string OffloadCheckpoints { get; set; } = "auto";
    /// <summary>With offloaded checkpoints: how many layers' kept gate/up go to host memory too (see <see cref="Accelerated.CheckpointOffload.MlpLayers"/>).</summary>
    public int OffloadMlpLayers { get; set; }
    /// <summary>fast, exact or auto (fast on CUDA with a bf16/fp16 base): see <see cref="Lora.LoraModel.UseFastTraining"/>.</summary>
    public string Kernels { get; set; } = "auto";
    /// <summary>auto, on or off: replay the training step from a CUDA graph (see <see cref="GraphedStep"/>); auto on the CUDA fast path without dropout.</summary>
    public string CudaGraph { get; set; } = "auto";
    public int Seed { get; set; }

    // evaluation and checkpoints
    public int EvalEvery { get; set; }
    public int EarlyStoppingPatience { get; set; }
    /// <summary>
    /// The metric early stopping and the best checkpoint follow: eval_loss, eval_accuracy (classification), or one of
    /// <see cref="SuiteMetrics"/> from the <see cref="EvalSuite"/> results (see <see cref="LowerIsBetter"/> for the direction).
    /// </summary>
    public string Metric { get; set; } = "eval_loss";
    /// <summary>
    /// Evaluation suites (JSONL case files) run at step 0 (the model before training) and at every evaluation through an
    /// <see cref="IStepEvaluator"/>; their pass rates go to metrics.jsonl and the report. Config key <c>eval_suite</c>:
    /// one path or a list.
    /// </summary>
    public List<string> EvalSuite { get; set; } = [];
    public int SaveEvery { get; set; }
    public int LogEvery { get; set; } = 1;

    /// <summary>The metrics an <see cref="IStepEvaluator"/> over evaluation suites reports that <see cref="Metric"/> may name.</summary>
    public static readonly IReadOnlyList<string> SuiteMetrics = ["suite:task", "suite:capability", "suite:safety", "suite:perplexity"];

    /// <summary>Whether a smaller value of <paramref name="metric"/> is better: losses and perplexities; accuracies and pass rates are better larger.</summary>
    public static bool LowerIsBetter(string metric) => metric is "eval_loss" or "suite:perplexity";

    // where it runs (not part of the run's identity)
    public string Device { get; set; } = "auto";
    public string? Dtype { get; set; }
    /// <summary>
    /// Price of one GPU-hour (any currency): report.json and the run's record then carry <c>cost</c> = wall hours × this
    /// (a CPU run is billed by its wall hours too, its device named beside it). Null: no cost recorded.
    /// </summary>
    public double? GpuHourCost { get; set; }
    /// <summary>none, or tensorboard: event files in RUN_DIR/tensorboard beside metrics.jsonl (<see cref="TensorBoardLog"/>).</summary>
    public string ReportTo { get; set; } = "none";

    // where the result goes (not part of the run's identity)
    /// <summary>
    /// Add the final adapter to the adapter registry under this name, with the run's lineage, when the run finishes
    /// (<c>lorakit train --register NAME</c>; the registry is a layer above training, so the CLI does it, not <see cref="Trainer.Run"/>).
    /// </summary>
    public string? Register { get; set; }
    /// <summary>The registry folder for <see cref="Register"/> and for an <see cref="InitAdapter"/> given as NAME@VERSION (default: LORAKIT_REGISTRY, else ~/.lorakit/registry).</summary>
    public string? Registry { get; set; }

    static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        WriteIndented = true,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    };

    /// <summary>Reads a JSON or YAML config file (see <see cref="TrainConfigFile"/>: LoraKit's keys or the HF/PEFT spellings).</summary>
    public static TrainConfig Load(string path) => TrainConfigFile.Load(path);

    /// <summary>
    /// The configuration a run in <paramref name="output"/> was started with, from its newest readable checkpoint (so that
    /// resuming needs only the output directory); null when there is none.
    /// </summary>
    public static TrainConfig? FromRun(string output)
    {
        foreach (var dir in Checkpoints.Complete(output))
        {
            try
            {
                var state = Checkpoints.ReadState(dir);
                var c = JsonSerializer.Deserialize<TrainConfig>(state.Config.ToJsonString(), Json) ?? new TrainConfig();
                c.Output = output;
                return c;
            }
            catch (Exception e) when (e is LoraKitException or JsonException) { }
        }
        return null;
    }

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    public JsonObject ToJsonObject() => (JsonObject)JsonNode.Parse(ToJson())!;

    /// <summary>Fields that change what is computed (not where): a resumed run must agree on all of them.</summary>
    public JsonObject Identity()
    {
        var o = ToJsonObject();
        foreach (var k in new[] { "output", "device", "kernels", "cuda_graph", "embeddings_on_host", "offload_checkpoints", "offload_mlp_layers", "log_every", "save_every", "register", "registry", "gpu_hour_cost", "report_to" }) o.Remove(k);
        // Added after runs were written: left out when off, so those runs keep their identity and still resume.
        if (!UseDora) o.Remove("use_dora");
        if (EvalSuite.Count == 0) o.Remove("eval_suite");
        if (Quantize is null) foreach (var k in new[] { "quantize", "double_quant", "quant_blocksize" }) o.Remove(k);
        return o;
    }

    public static string Hash(string s) => Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(s)))[..16].ToLowerInvariant();

    public void Validate()
    {
        void Check(bool ok, string msg) { if (!ok) throw new ArgumentException(msg); }
        static string Q(string s) => s.Length > 40 ? s[..40] + "…" : s;
        foreach (var p in typeof(TrainConfig).GetProperties().Where(p => p.PropertyType == typeof(double)))
            Check(double.IsFinite((double)p.GetValue(this)!), $"{JsonNamingPolicy.SnakeCaseLower.ConvertName(p.Name)} must be a finite number");
        Check(GpuHourCost is null || (double.IsFinite(GpuHourCost.Value) && GpuHourCost >= 0), "`gpu_hour_cost` must be a number ≥ 0");
        Check(ReportTo is "none" or "tensorboard", $"`report_to` must be none or tensorboard, not '{Q(ReportTo)}'");
        Check(Output.Length > 0, "the output directory is required");
        Check(R > 0, "r must be positive");
        Check(TargetModules.Count > 0, "target_modules must name at least one module");
        Check(Model.Length > 0, "`model` is required");
        Check(Kernels is "auto" or "fast" or "exact", $"`kernels` must be auto, fast or exact, not '{Q(Kernels)}'");
        Check(CudaGraph is "auto" or "on" or "off", $"`cuda_graph` must be auto, on or off, not '{Q(CudaGraph)}'");
        Check(EmbeddingsOnHost is "auto" or "on" or "off", $"`embeddings_on_host` must be auto, on or off, not '{Q(EmbeddingsOnHost)}'");
        Check(OffloadCheckpoints is "auto" or "on" or "off", $"`offload_checkpoints` must be auto, on or off, not '{Q(OffloadCheckpoints)}'");
        Check(OffloadMlpLayers >= 0, "`offload_mlp_layers` must be ≥ 0");
        Check(Data.Length > 0, "`data` is required");
        Check(Method is "lora" or "full", $"method must be lora or full (got '{Q(Method)}')");
        Check(Quantize is null or "nf4" or "fp4" or "int8", $"`quantize` must be nf4, fp4 or int8, not '{Q(Quantize ?? "")}'");
        Check(DoubleQuant is "on" or "off", $"`double_quant` must be on or off, not '{Q(DoubleQuant)}'");
        Check(Quantization.QuantState.ValidBlocksizes.Contains(QuantBlocksize), $"`quant_blocksize` must be one of {string.Join(", ", Quantization.QuantState.ValidBlocksizes)}, not {QuantBlocksize}");
        Check(Quantize is null || Method == "lora", "`quantize` freezes the base in packed form; it trains LoRA adapters only, not method full");
        Check(Schedule is "constant" or "linear" or "cosine", $"schedule must be constant, linear or cosine (got '{Q(Schedule)}')");
        Check(Lr > 0, "lr must be positive");
        Check(BatchSize > 0 && GradAccum > 0, "batch size and gradient accumulation must be positive");
        Check(Steps >= 0 && Epochs > 0, "steps must be ≥ 0 and epochs positive");
        Check(MaxLength >= 2, "max length must be at least 2");
        Check(ValidationFraction >= 0 && ValidationFraction < 1, "validation fraction must be in [0, 1)");
        Check(WarmupSteps >= 0 && WeightDecay >= 0 && MaxGradNorm >= 0, "warmup, weight decay and max grad norm must be ≥ 0");
        Check(Beta1 is >= 0 and < 1 && Beta2 is >= 0 and < 1 && AdamEps > 0, "betas must be in [0, 1) and eps positive");
        Check(Metric is "eval_loss" or "eval_accuracy" || SuiteMetrics.Contains(Metric),
            $"metric must be eval_loss, eval_accuracy or one of {string.Join(", ", SuiteMetrics)} (got '{Q(Metric)}')");
        Check(EvalSuite.All(p => !string.IsNullOrWhiteSpace(p)), "`eval_suite` must name files (an empty path was given)");
        Check(!SuiteMetrics.Contains(Metric) || EvalSuite.Count > 0, $"`metric` {Metric} needs an evaluation suite to measure it: give `eval_suite`");
        Check(EvalEvery >= 0 && EarlyStoppingPatience >= 0 && SaveEvery >= 0 && LogEvery > 0, "eval/save/log intervals must be ≥ 0");
    }
}
