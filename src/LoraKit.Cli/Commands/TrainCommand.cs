using System.CommandLine;
using System.Reflection;
using LoraKit.Distributed;
using LoraKit.Training;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit train</c>. Every <see cref="TrainConfig"/> field is a flag named after it (batch_size → --batch-size;
/// booleans that default to true are switched off with --no-…). A --config file (JSON or YAML) sets the starting
/// values; flags given on the command line override it. <c>--init-adapter</c> takes a registered NAME@VERSION / NAME@ALIAS
/// too, and <c>--register NAME</c> adds the finished run's adapter to the registry with its lineage (<see cref="TrainRegistration"/>).
/// <c>--gpus N</c> starts N ranks of this same command (<see cref="GroupLauncher"/>); a process started with torchrun's
/// variables (RANK, WORLD_SIZE, …) joins that group directly (<see cref="DistributedEnv"/>), on GPU LOCAL_RANK.
/// </summary>
public static class TrainCommand
{
    static readonly Dictionary<string, string> Help = new()
    {
        ["model"] = "base model directory (Hugging Face layout)",
        ["data"] = "training JSONL: {\"text\"}, {\"prompt\",\"completion\"}, {\"messages\"}, or {\"text\",\"label\"} (classification head)",
        ["validation_data"] = "validation JSONL (same format)",
        ["validation_fraction"] = "hold out this fraction of --data for validation when no validation file is given",
        ["output"] = "output directory: adapter/, best/, checkpoints/, metrics.jsonl, report.html, loss.png",
        ["method"] = "lora, or full (fine-tune every weight, for comparison)",
        ["init_adapter"] = "start from this PEFT adapter (a directory, or a registered NAME@VERSION / NAME@ALIAS) instead of a fresh one",
        ["r"] = "LoRA rank",
        ["lora_alpha"] = "LoRA alpha (scaling alpha/r, or alpha/√r with --use-rslora)",
        ["lora_dropout"] = "dropout on the LoRA input",
        ["target_modules"] = "comma-separated module names, or all-linear",
        ["use_rslora"] = "rank-stabilised scaling alpha/√r",
        ["use_dora"] = "DoRA (PEFT's use_dora): a trainable magnitude per output row beside the low-rank update; the CUDA fast path declines it (reference path)",
        ["format"] = "auto, text, prompt-completion or chat",
        ["max_length"] = "truncate samples to this many tokens",
        ["packing"] = "pack several samples per row (attention and positions restart at each sample)",
        ["shuffle"] = "shuffle the training data each epoch (seeded)",
        ["eos"] = "append EOS to text and completion samples",
        ["train_on_all_tokens"] = "take loss on prompts and user turns too",
        ["skip_bad_lines"] = "skip malformed JSONL lines (reported and counted) instead of stopping",
        ["lr"] = "peak learning rate",
        ["schedule"] = "constant, linear or cosine (after warm-up)",
        ["warmup_steps"] = "linear warm-up steps",
        ["weight_decay"] = "AdamW decoupled weight decay",
        ["beta1"] = "AdamW beta1",
        ["beta2"] = "AdamW beta2",
        ["adam_eps"] = "AdamW epsilon",
        ["max_grad_norm"] = "clip the global gradient norm (0 = off)",
        ["batch_size"] = "samples per micro-batch",
        ["grad_accum"] = "micro-batches per optimizer step",
        ["steps"] = "optimizer steps (0 = --epochs passes over the data)",
        ["epochs"] = "passes over the data when --steps is 0",
        ["gradient_checkpointing"] = "recompute layer activations in backward to save memory",
        ["checkpoint_keep_gib"] = "with checkpointing on the fast path: GiB that layers may spend keeping their gate/up outputs, so backward does not recompute those GEMMs (0 = least memory)",
        ["embeddings_on_host"] = "auto, on or off: keep an untied input embedding in host memory and read each batch's rows over PCIe (frees vocab × hidden of device memory, 1 GiB on Llama-3-8B; auto: with --gradient-checkpointing on CUDA)",
        ["offload_checkpoints"] = "auto, on or off: with checkpointing on the fast path, move each layer's checkpoint (input and mid-layer residual) to host memory during the forward and back before its backward, on a copy stream beside the compute (frees 2 × tokens × hidden per layer, 2 GiB on Llama-3-8B at 4,096 tokens, for --checkpoint-keep-gib to spend; auto: with --gradient-checkpointing on CUDA)",
        ["offload_mlp_layers"] = "with offloaded checkpoints: also send the kept gate/up outputs of this many layers (every third from the first, so the copies keep up with the compute) to host memory, which --checkpoint-keep-gib then spends again (on q/k/v outputs once every layer keeps gate/up)",
        ["kernels"] = "fast (LoRA branch in the base's dtype, RMSNorm/SwiGLU with lean backwards), exact (PEFT's fp32 LoRA branch) or auto (fast on CUDA with a bf16/fp16 base)",
        ["cuda_graph"] = "auto, on or off: capture the training step as a CUDA graph and replay it for every batch of the same shape (auto: on the CUDA fast path without dropout; most useful with --packing, whose batches share one shape)",
        ["seed"] = "seed for initialisation, shuffling and dropout",
        ["eval_every"] = "evaluate every N steps (0 = about 10 times per run)",
        ["early_stopping_patience"] = "stop after N evaluations without a better --metric (0 = off)",
        ["metric"] = "metric for early stopping and best/: eval_loss, eval_accuracy (classification), or suite:task, suite:capability, suite:safety (pass rates, higher is better), suite:perplexity (lower is better) with --eval-suite",
        ["eval_suite"] = "evaluation suite (JSONL cases) to run at step 0 (the base) and at every evaluation; pass rates go to metrics.jsonl and the report (repeat for several)",
        ["save_every"] = "checkpoint every N steps (0 = at each evaluation)",
        ["log_every"] = "log every N steps",
        ["device"] = "auto, cpu or cuda",
        ["dtype"] = "fp32, bf16 or fp16 for the frozen base (default: bf16 on CUDA, fp32 on CPU); LoRA weights stay fp32",
        ["quantize"] = "nf4, fp4 or int8: quantize the frozen base's linear layers on load and keep them packed (QLoRA); a pre-quantized bitsandbytes checkpoint needs no flag",
        ["double_quant"] = "on or off: with --quantize nf4/fp4, quantize the absmax too",
        ["quant_blocksize"] = "with --quantize nf4/fp4: values per absmax block",
        ["report_to"] = "none, or tensorboard: also write TensorBoard event files into OUTPUT/tensorboard",
        ["gpu_hour_cost"] = "price of one GPU-hour: report.json and the run's record get cost = wall hours × this (CPU runs too, device named)",
        ["register"] = "when the run finishes, add the adapter to the registry as the next version of this NAME, with the run's lineage",
        ["registry"] = "adapter registry folder for --register, a named --init-adapter and the run's record (lorakit runs list; a registry that cannot be written is warned about, never fails the run); unset, $LORAKIT_REGISTRY, else ~/.lorakit/registry",
    };

    public static Command Build()
    {
        var cmd = new Command("train", "Train a LoRA adapter (or fine-tune fully) on a JSONL dataset, with evaluation, checkpoints and a report.");
        var config = new Option<string?>("--config") { Description = "JSON or YAML file with any of the options below (snake_case keys)" };
        var resume = new Option<bool>("--resume") { Description = "continue the run in --output from its last completed checkpoint (its configuration is read from the checkpoint; a larger --steps extends a finished run)" };
        var overwrite = new Option<bool>("--overwrite") { Description = "start again in an --output that holds a run: deletes only the files LoraKit wrote there" };
        cmd.Options.Add(config);
        cmd.Options.Add(resume);
        cmd.Options.Add(overwrite);
        var gpus = new Option<int>("--gpus") { Description = "data-parallel training on N GPUs of this machine: starts N ranks over NCCL, each with batch size --batch-size (the global batch is N × batch size × grad accum); rank 0 writes the run (default: 1)" };
        cmd.Options.Add(gpus);
        var defaults = new TrainConfig();
        var bindings = new List<(Option option, PropertyInfo prop)>();
        foreach (var prop in typeof(TrainConfig).GetProperties())
        {
            string snake = System.Text.Json.JsonNamingPolicy.SnakeCaseLower.ConvertName(prop.Name);
            object? dflt = prop.GetValue(defaults);
            string help = Help.GetValueOrDefault(snake, snake);
            Option option;
            if (prop.PropertyType == typeof(bool) && (bool)dflt! )
                option = new Option<bool>("--no-" + snake.Replace('_', '-')) { Description = $"do not {help} (default: on)" };
            else if (prop.PropertyType == typeof(bool))
                option = new Option<bool>("--" + snake.Replace('_', '-')) { Description = $"{help} (default: off)" };
            else if (prop.Name == nameof(TrainConfig.EvalSuite))
                option = new Option<string[]>("--eval-suite") { Description = $"{help} (default: none)", AllowMultipleArgumentsPerToken = false };
            else if (prop.PropertyType == typeof(List<string>))
                option = new Option<string>("--" + snake.Replace('_', '-')) { Description = $"{help} (default: {string.Join(",", (List<string>)dflt!)})" };
            else
            {
                var type = typeof(Option<>).MakeGenericType(prop.PropertyType);
                option = (Option)Activator.CreateInstance(type, "--" + snake.Replace('_', '-'), Array.Empty<string>())!;
                option.Description = $"{help} (default: {(dflt is null or "" ? "none" : Convert.ToString(dflt, System.Globalization.CultureInfo.InvariantCulture))})";
            }
            cmd.Options.Add(option);
            bindings.Add((option, prop));
        }

        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            TrainConfig c;
            if (r.GetValue(config) is string path) c = TrainConfig.Load(path);
            else if (r.GetValue(resume))
            {
                // --output DIR --resume is enough: the checkpoint holds the run's configuration; flags given override it.
                var outOption = bindings.First(b => b.prop.Name == nameof(TrainConfig.Output)).option;
                var output = r.GetResult(outOption) is { Implicit: false } ? (string)GetValue(r, outOption)! : new TrainConfig().Output;
                c = TrainConfig.FromRun(output) ?? new TrainConfig();
            }
            else c = new TrainConfig();
            foreach (var (option, prop) in bindings)
            {
                var result = r.GetResult(option);
                if (result is null || result.Implicit) continue;
                object? value = GetValue(r, option);
                if (option.Name.StartsWith("--no-", StringComparison.Ordinal)) value = !(bool)value!;
                else if (value is string[] paths) value = paths.ToList(); // file paths: one per flag, never split on commas
                else if (prop.PropertyType == typeof(List<string>))
                    value = ((string)value!).Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList();
                prop.SetValue(c, value);
            }
            c.Model = ModelArgument.Resolve(c.Model); // a hub id: its snapshot folder, downloaded before anything else
            var env = DistributedEnv.FromEnvironment();
            int gpuCount = r.GetValue(gpus);
            if (r.GetResult(gpus) is { Implicit: false } && gpuCount < 1) throw new ArgumentException($"--gpus {gpuCount}: expected 1 or more");
            if (gpuCount > 1 && env.IsDistributed)
                throw new ArgumentException($"--gpus starts its own ranks, but this process is already rank {env.Rank} of {env.WorldSize} (WORLD_SIZE is set, e.g. by torchrun): drop one of them");
            if (gpuCount > 1) return LaunchRanks(gpuCount, c);
            string? initAdapterRef = TrainRegistration.Prepare(c); // names resolved, --register checked, before any loading
            using var group = env.IsDistributed ? JoinGroup(env, c) : null;
            bool lead = env.IsLead;
            ITrainLog log = lead ? new ConsoleTrainLog(!Console.IsOutputRedirected) : new RankLog();
            // Ctrl+C and SIGTERM (docker stop, systemd, Kubernetes) end the run after the current step, with a checkpoint
            // and the adapter so far saved; a second signal is not intercepted and ends the process at once.
            using var stop = new CancellationTokenSource();
            int signals = 0;
            void OnSignal(System.Runtime.InteropServices.PosixSignalContext ctx)
            {
                if (Interlocked.Increment(ref signals) > 1) return;
                ctx.Cancel = true;
                Console.Error.WriteLine($"\n{(ctx.Signal == System.Runtime.InteropServices.PosixSignal.SIGTERM ? "SIGTERM" : "interrupt")}: finishing the current step, then saving a checkpoint and the adapter (again to stop at once)");
                stop.Cancel();
            }
            using var sigint = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, OnSignal);
            using var sigterm = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, OnSignal);
            IStepEvaluator? suites = SuiteEvaluator(c);
            using var ownsSuites = suites as IDisposable;
            TrainResult trained;
            // Every run is recorded in the registry (`lorakit runs list`); see RunTracker: it never fails the run.
            var tracker = lead ? new LoraKit.Registry.RunTracker(c.Registry, log.Warn) : null;
            try
            {
                trained = Trainer.Run(c, r.GetValue(resume), log, r.GetValue(overwrite), stop.Token, suites, initAdapterRef, tracker, group?.Collectives);
                group?.Finish();
                if (tracker?.RunId is long id) log.Info($"run {id} recorded in the registry (lorakit runs show {id})");
            }
            catch (TrainingInterruptedException e)
            {
                (log as ConsoleTrainLog)?.Done();
                if (!lead) return 130;
                Console.Error.WriteLine($"{e.Message}; continue with: lorakit train --output {c.Output} --resume" +
                                        (c.Register is { } name ? $" --register {name}{(c.Registry is { } reg ? $" --registry {reg}" : "")} (not registered: the run did not finish)" : ""));
                return 130;
            }
            (log as ConsoleTrainLog)?.Done();
            if (lead && c.Register is not null) TrainRegistration.Register(c, trained);
            return 0;
        }));
        return cmd;
    }

    /// <summary>
    /// Joins the group torchrun's variables describe: on GPU LOCAL_RANK with NCCL, or on CPU through the store when the
    /// run's device is cpu (or auto without GPUs): the CPU group runs the same path, for tests and debugging.
    /// </summary>
    static ProcessGroup JoinGroup(DistributedEnv env, TrainConfig c)
    {
        string device = c.Device.ToLowerInvariant();
        bool cuda = device != "cpu" && (device != "auto" || CudaDevice.Count() > 0);
        if (cuda) c.Device = $"cuda:{env.LocalRank}";
        return ProcessGroup.Join(env, cuda, ProcessGroup.TimeoutFromEnvironment());
    }

    /// <summary>
    /// <c>--gpus N</c>: this same command line (without --gpus) as N ranks on this machine, their output forwarded with a
    /// "[rank k]" prefix. SIGTERM is passed on (each rank saves after its current step); Ctrl+C reaches the ranks from
    /// the terminal itself. Returns the group's exit code, with one line when a rank failed.
    /// </summary>
    static int LaunchRanks(int n, TrainConfig c)
    {
        if (c.Device.ToLowerInvariant() != "cpu")
        {
            int visible = CudaDevice.Count();
            if (n > visible) throw new ArgumentException($"--gpus {n}: only {visible} CUDA device(s) are visible (nvidia-smi lists them; CUDA_VISIBLE_DEVICES may hide some)");
        }
        var (fileName, args) = SelfCommand();
        var launcher = new GroupLauncher();
        var gate = new object();
        void Write(string line, bool error)
        {
            lock (gate) (error ? Console.Error : Console.Out).WriteLine(line);
        }
        using var term = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, ctx =>
        {
            ctx.Cancel = true;
            launcher.Terminate();
        });
        using var intr = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, ctx => ctx.Cancel = true);
        var outcome = launcher.Run(n, fileName, args, Write);
        if (outcome.Message is string m) Console.Error.WriteLine($"error: {m}");
        return outcome.ExitCode;
    }

    /// <summary>How to start this process again with the same arguments minus --gpus: the host (dotnet) and the CLI assembly, or the apphost.</summary>
    static (string fileName, List<string> args) SelfCommand()
    {
        var argv = Environment.GetCommandLineArgs();
        var rest = new List<string>();
        for (int i = 1; i < argv.Length; i++)
        {
            if (argv[i] == "--gpus") { i++; continue; }
            if (argv[i].StartsWith("--gpus=", StringComparison.Ordinal)) continue;
            rest.Add(argv[i]);
        }
        string host = Environment.ProcessPath ?? throw new InvalidOperationException("cannot tell which program this is, to start its ranks");
        bool viaDotnet = Path.GetFileNameWithoutExtension(host).Equals("dotnet", StringComparison.OrdinalIgnoreCase);
        return viaDotnet ? (host, [argv[0], .. rest]) : (host, rest);
    }

    /// <summary>
    /// The evaluator that runs the configuration's evaluation suites during training (<c>--eval-suite</c>), or null when
    /// it names none. Built after the configuration is complete (file, flags, or a resumed run's checkpoint).
    /// </summary>
    static IStepEvaluator? SuiteEvaluator(TrainConfig c) =>
        c.EvalSuite.Count == 0 ? null : LoraKit.Evaluation.SuiteStepEvaluator.ForModel(c.Model, c.EvalSuite);

    static object? GetValue(ParseResult r, Option option)
    {
        var method = typeof(ParseResult).GetMethods().First(m => m.Name == "GetValue" && m.IsGenericMethod && m.GetParameters()[0].ParameterType.IsGenericType
            && m.GetParameters()[0].ParameterType.GetGenericTypeDefinition() == typeof(Option<>));
        var valueType = option.GetType().GetGenericArguments()[0];
        return method.MakeGenericMethod(valueType).Invoke(r, [option]);
    }
}

/// <summary>A data-parallel rank other than 0: warnings only (rank 0 reports the run; the launcher prefixes each line with its rank).</summary>
sealed class RankLog : ITrainLog
{
    public void Info(string message) { }
    public void Warn(string message) => Console.Error.WriteLine($"warning: {FlagNames.Rephrase(message)}");
    public void Step(StepMetrics m) { }
    public void Eval(EvalMetrics m) { }
}

/// <summary>Progress for people: a live one-line bar on a terminal, plain log lines when output is redirected.</summary>
public sealed class ConsoleTrainLog(bool interactive) : ITrainLog
{
    bool _barShown;

    public void Info(string message) { ClearBar(); Console.WriteLine(FlagNames.Rephrase(message)); }

    public void Warn(string message) { ClearBar(); Console.Error.WriteLine($"warning: {FlagNames.Rephrase(message)}"); }

    public void Step(StepMetrics m)
    {
        double eta = m.Step > 0 ? m.ElapsedSeconds / m.Step * (m.TotalSteps - m.Step) : 0;
        string stats = $"step {m.Step}/{m.TotalSteps}  loss {m.Loss:F4}  lr {m.Lr:E2}  {m.TokensPerSecond:N0} tok/s  ETA {TimeSpan.FromSeconds(eta):mm\\:ss}";
        if (!interactive) { Console.WriteLine(stats); return; }
        int width = 24, done = (int)Math.Round(width * (double)m.Step / m.TotalSteps);
        Console.Write($"\r[{new string('#', done)}{new string('.', width - done)}] {stats}   ");
        _barShown = true;
    }

    public void Eval(EvalMetrics m)
    {
        var parts = new List<string>();
        if (m.Validated) parts.Add($"loss {m.Loss:F4}, " + (m.Accuracy is double a ? $"accuracy {a:P1}" : $"perplexity {m.Perplexity:F2}"));
        if (m.Suites is { } suites) parts.AddRange(suites.Select(kv => $"{kv.Key} {TrainReport.Format(kv.Key, kv.Value)}"));
        Info($"eval @ step {m.Step}{(m.Step == 0 ? " (before training)" : "")}: {string.Join(", ", parts)}" + (m.IsBest ? " (best)" : ""));
    }

    void ClearBar()
    {
        if (_barShown) { Console.WriteLine(); _barShown = false; }
    }

    public void Done() => ClearBar();
}
