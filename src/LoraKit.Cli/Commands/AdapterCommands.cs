using System.CommandLine;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using static TorchSharp.torch;

namespace LoraKit.Cli.Commands;

/// <summary><c>lorakit adapter info</c>, <c>lorakit merge</c> and <c>lorakit combine</c>.</summary>
public static class AdapterCommands
{
    public static Command Adapter()
    {
        var dir = new Argument<string>("DIR") { Description = "PEFT-format adapter directory" };
        var json = new Option<bool>("--json") { Description = "print JSON" };
        var info = new Command("info", "Show an adapter's rank, alpha, targets, trainable parameters and file size.") { dir, json };
        info.SetAction(r => CommonOptions.Run(() =>
        {
            string d = r.GetValue(dir)!;
            var config = LoraConfig.Load(d);
            config.Validate();
            var weights = Path.Combine(d, AdapterFiles.WeightsFile);
            using var file = SafetensorsFile.Open(weights);
            long parameters = file.Entries.Values.Sum(e => e.Shape.Aggregate(1L, (a, b) => a * b));
            int modules = file.Entries.Keys.Count(k => k.EndsWith(".lora_A.weight", StringComparison.Ordinal));
            var task = AdapterFiles.Task(d);
            long bytes = (new FileInfo(weights).ResolveLinkTarget(true) as FileInfo ?? new FileInfo(weights)).Length; // HF cache: a link into blobs/
            string targets = config.TargetRegex ?? string.Join(", ", config.TargetModules!.Select(t => t.Split('.')[^1]).Distinct().Order());
            if (r.GetValue(json))
            {
                Console.WriteLine(CliJson.Serialize(new
                {
                    r = config.R, lora_alpha = config.LoraAlpha, use_rslora = config.UseRslora, target_modules = targets, modules,
                    trainable_params = parameters, file_bytes = bytes, base_model = config.BaseModelNameOrPath,
                    task_type = task.TaskType, labels = task.Labels,
                    base_fingerprint = file.Metadata.GetValueOrDefault(BaseFingerprint.MetadataKey),
                }));
                return 0;
            }
            Console.WriteLine($"adapter:          {Path.GetFullPath(d)}");
            Console.WriteLine($"base model:       {config.BaseModelNameOrPath ?? "(not recorded)"}");
            Console.WriteLine($"task type:        {task.TaskType}{(task.IsSequenceClassification ? " (sequence classification: `lorakit classify`)" : "")}");
            if (task.Labels is { } labels) Console.WriteLine($"labels:           {labels.Count}: {task.LabelList}");
            Console.WriteLine($"base fingerprint: {(file.Metadata.TryGetValue(BaseFingerprint.MetadataKey, out var fp) ? BaseFingerprint.Short(fp) : "(none: not written by LoraKit)")}");
            Console.WriteLine($"rank (r):         {config.R}{(config.RankPattern.Count > 0 ? $" (patterns: {string.Join(", ", config.RankPattern.Select(kv => $"{kv.Key}={kv.Value}"))})" : "")}");
            Console.WriteLine($"lora_alpha:       {config.LoraAlpha}{(config.UseRslora ? " (rsLoRA: scaling alpha/√r)" : " (scaling alpha/r)")}");
            Console.WriteLine($"targets:          {targets}{(config.LayersToTransform is { } l ? $" in layers {string.Join(", ", l)}" : "")}");
            Console.WriteLine($"wrapped modules:  {modules}");
            Console.WriteLine($"trainable params: {parameters:N0}");
            Console.WriteLine($"file size:        {bytes / 1024.0:F1} KiB");
            return 0;
        }));
        var cmd = new Command("adapter", "Inspect LoRA adapters.");
        cmd.Subcommands.Add(info);
        return cmd;
    }

    static (Option<string> model, Option<string> output, Option<string> device, Option<string?> dtype) ModelOutputOptions(Command c)
    {
        var model = new Option<string>("--model") { Description = "base model directory", Required = true };
        var output = new Option<string>("--output") { Description = "output directory (must not exist or be empty)", Required = true };
        var device = new Option<string>("--device") { Description = "auto, cpu or cuda", DefaultValueFactory = _ => "cpu" };
        var dtype = new Option<string?>("--dtype") { Description = "dtype to load and write (default: fp32 on CPU, bf16 on CUDA)" };
        foreach (var o in new Option[] { model, output, device, dtype }) c.Options.Add(o);
        return (model, output, device, dtype);
    }

    public static Command Merge()
    {
        var cmd = new Command("merge", "Merge an adapter into the base weights and write a full Hugging Face checkpoint.");
        var adapter = new Option<string>("--adapter") { Description = "PEFT-format adapter directory", Required = true };
        var allow = CommonOptions.NewAllowBaseMismatch();
        var gateReport = new Option<string?>("--gate-report") { Description = "eval.json from `lorakit eval` holding a passed gate for this adapter on this base" };
        var noGate = new Option<bool>("--no-gate") { Description = "merge without a passed gate (warned, and recorded in the merged config.json)" };
        cmd.Options.Add(adapter);
        cmd.Options.Add(allow);
        cmd.Options.Add(gateReport);
        cmd.Options.Add(noGate);
        var registry = AdapterArgument.RegistryOption();
        cmd.Options.Add(registry);
        var mergeBase = new Option<string[]>("--merge-base")
        {
            Description = "for an adapter trained on a quantized base: dequantized (default: the weights it was trained against) or original [DIR] " +
                          "(the full-precision weights; DIR is where they live when --model is pre-quantized, and with dequantized the comparison)",
            Arity = new ArgumentArity(1, 2), AllowMultipleArgumentsPerToken = true,
        };
        var quantizeOutput = new Option<string?>("--quantize-output") { Description = "re-quantize the merged model: nf4, fp4 or int8 (a bitsandbytes checkpoint; prints what it costs)" };
        var probeText = new Option<string?>("--probe-text") { Description = "text on which a quantized merge measures the logit difference of the choices (default: a fixed sentence)" };
        foreach (var o in new Option[] { mergeBase, quantizeOutput, probeText }) cmd.Options.Add(o);
        var (model, output, device, dtype) = ModelOutputOptions(cmd);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            OutputDirectory.EnsureNewOrEmpty(r.GetValue(output)!); // before minutes of loading and merging
            var adapterDir = AdapterArgument.Resolve(r.GetValue(adapter)!, r.GetValue(registry));
            var modelDir = ModelArgument.Resolve(r.GetValue(model)!);
            var provenance = MergeGate.Check(modelDir, adapterDir, r.GetValue(gateReport), r.GetValue(noGate));
            var (dev, dt) = Placement.Resolve(r.GetValue(device)!, r.GetValue(dtype));
            var (requested, originalDir) = QuantizedMergeArguments.MergeBase(r.GetValue(mergeBase));
            var plan = MergeBasePlan.Make(modelDir, adapterDir, requested, originalDir, r.GetValue(allow), AdapterLoadOptions.Default.Warn);
            var requantize = QuantizedMergeArguments.QuantizeOutput(r.GetValue(quantizeOutput), plan.TrainedOn, r.GetValue(dtype) is null ? ScalarType.BFloat16 : dt);
            if (plan.Quantized || requantize is not null)
            {
                // Quantization involved: written in bf16 unless --dtype says otherwise (the merge itself is computed in fp32).
                var result = QuantizedBaseMerge.Merge(plan, r.GetValue(output)!, r.GetValue(dtype) is null ? ScalarType.BFloat16 : dt, dev, requantize,
                    r.GetValue(probeText), provenance, AdapterLoadOptions.Default.Warn);
                QuantizedMergeArguments.Print(result, r.GetValue(output)!, requantize);
                return 0;
            }
            if (r.GetValue(probeText) is not null)
                throw new LoraKitException("--probe-text applies when quantization is involved (an adapter trained on a quantized base, a pre-quantized --model, or --quantize-output)");
            if (Directory.Exists(adapterDir) && AdapterFiles.Task(adapterDir) is { IsSequenceClassification: true } task)
            {
                // A classifier merges into a *ForSequenceClassification checkpoint: the score head replaces the LM head.
                using var clf = Classification.TextClassifier.Load(modelDir, adapterDir, dt, dev);
                clf.SaveMerged(modelDir, r.GetValue(output)!, provenance);
                Console.WriteLine($"merged {adapterDir} into {r.GetValue(model)} → {r.GetValue(output)} " +
                    $"({clf.Model.Config.Architecture.Replace("ForCausalLM", "ForSequenceClassification")}, labels: {task.LabelList})");
                return 0;
            }
            Progress.CliProgress.Run("merge", sink => MergedCheckpoint.Merge(modelDir, adapterDir, r.GetValue(output)!, new Placement(dev, dt),
                new AdapterLoadOptions { AllowBaseMismatch = r.GetValue(allow) }, provenance, sink.AsCallback()), unit: "steps");
            Console.WriteLine($"merged {adapterDir} into {r.GetValue(model)} → {r.GetValue(output)}");
            return 0;
        }));
        return cmd;
    }

    public static Command Combine()
    {
        var cmd = new Command("combine", "Combine adapters into one (PEFT add_weighted_adapter: linear, cat or svd) and save it in PEFT format.");
        var adapters = new Option<string>("--adapters") { Description = "DIR1:WEIGHT1,DIR2:WEIGHT2,... (each DIR a PEFT adapter directory or a registered NAME@VERSION / NAME@ALIAS)", Required = true };
        var method = new Option<string>("--method") { Description = "linear (equal ranks), cat or svd", DefaultValueFactory = _ => "cat" };
        var svdRank = new Option<int?>("--svd-rank") { Description = "target rank for svd (default: the largest input rank)" };
        cmd.Options.Add(adapters);
        cmd.Options.Add(method);
        cmd.Options.Add(svdRank);
        var allow = CommonOptions.NewAllowBaseMismatch();
        cmd.Options.Add(allow);
        var registry = AdapterArgument.RegistryOption();
        cmd.Options.Add(registry);
        var (model, output, device, dtype) = ModelOutputOptions(cmd);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var parts = r.GetValue(adapters)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(p =>
            {
                int colon = p.LastIndexOf(':');
                if (colon <= 0 || !double.TryParse(p[(colon + 1)..], System.Globalization.CultureInfo.InvariantCulture, out double w))
                    throw new ArgumentException($"'{p}' is not DIR:WEIGHT");
                return (dir: p[..colon], w);
            }).ToList();
            parts = parts.Select(p => (AdapterArgument.Resolve(p.dir, r.GetValue(registry)), p.w)).ToList(); // names before minutes of loading
            var outDir = r.GetValue(output)!;
            var combined = AdapterFileCombiner.Combine(ModelArgument.Resolve(r.GetValue(model)!), parts, r.GetValue(method)!, r.GetValue(svdRank), outDir,
                Placement.Resolve(r.GetValue(device)!, r.GetValue(dtype)), new AdapterLoadOptions { AllowBaseMismatch = r.GetValue(allow) });
            Console.WriteLine($"combined {parts.Count} adapters ({r.GetValue(method)}) → {outDir} (r={combined.R})");
            return 0;
        }));
        return cmd;
    }
}
