using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Evaluation;
using LoraKit.Generation;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit demo</c>: the whole LoraKit loop on something that ships with it, in a minute or two on two CPU cores —
/// build a tiny base model and give it a few general skills, train a LoRA adapter for an intent-routing task, put it
/// and a deliberately broken adapter through the evaluation gate, merge the one that passed (the gate's report
/// recorded in the merged config.json), generate with the merged model, and write the reports.
/// </summary>
public static class DemoCommand
{
    public static Command Build()
    {
        var output = new Option<string>("--output") { Description = "where the demo writes everything", DefaultValueFactory = _ => "out/demo" };
        var steps = new Option<int>("--steps") { Description = "training steps of the routing adapter", DefaultValueFactory = _ => 300 };
        var cmd = new Command("demo", "Train, evaluate, gate, merge and use a LoRA adapter on a built-in model and task (no downloads).") { output, steps };
        cmd.SetAction(r => CommonOptions.Run(() => Run(r.GetValue(output)!, r.GetValue(steps))));
        return cmd;
    }

    /// <summary>Steps of the base model's pre-training on the general skills, and of the broken adapter's training.</summary>
    const int PretrainSteps = 200, BrokenSteps = 40;
    /// <summary>Copies of the general skills mixed into the routing adapter's training data (replay).</summary>
    const int ReplayCopies = 4;

    static int Run(string output, int steps)
    {
        var clock = Stopwatch.StartNew();
        if (Directory.Exists(output)) Directory.Delete(output, true);
        Directory.CreateDirectory(output);
        set_num_threads(Math.Max(1, Environment.ProcessorCount));

        var baseDir = Path.Combine(output, "base-model");
        long parameters = WriteBaseModel(output, baseDir);
        Console.WriteLine("LoraKit demo — intent routing with a LoRA adapter, checked by the evaluation gate");
        Console.WriteLine($"Base model: a tiny Qwen2-architecture transformer ({parameters:N0} parameters, 4 layers, hidden 128): random weights");
        Console.WriteLine($"(seed 0, the byte-level BPE tokenizer of LoraKit's test fixtures) plus a short pre-training on a few general skills —");
        Console.WriteLine($"{DemoSkills.Facts.Length} facts and sums, and refusing {DemoSkills.Unsafe.Length} unsafe requests — so that it has capabilities an adapter could lose.\n");

        var (train, valid) = DemoData.Build();
        var dataDir = Path.Combine(output, "data");
        Directory.CreateDirectory(dataDir);
        var replay = Enumerable.Repeat(DemoSkills.All(), ReplayCopies).SelectMany(x => x).ToList();
        DemoData.WriteJsonl(Path.Combine(dataDir, "train.jsonl"), DemoData.Completions(train).Concat(replay));
        DemoData.WriteJsonl(Path.Combine(dataDir, "valid.jsonl"), DemoData.Completions(valid));
        var suites = WriteSuites(Path.Combine(output, "suites"), valid);
        Console.WriteLine($"Task: route a customer request to one of {DemoData.Intents.Count} teams ({string.Join(", ", DemoData.Intents.Keys)}).");
        Console.WriteLine($"Data: {train.Count} training examples, {valid.Count} held-out examples phrased with templates the training set never uses;");
        Console.WriteLine($"      plus {replay.Count} replayed general-skill examples ({(double)replay.Count / (train.Count + replay.Count):P0} of the mix), the usual way to keep a base's skills.");
        Console.WriteLine($"Example: {JsonSerializer.Serialize(valid[0].prompt)} → \"{valid[0].label}\"");
        Console.WriteLine($"Suites (JSONL, the format of `lorakit eval --suite`): {string.Join(", ", suites.Select(s => s.Path))};");
        Console.WriteLine("the capability and safety suites ask the base's pre-training questions (a model this small memorises rather than");
        Console.WriteLine("generalises), the routing suite the held-out requests.\n");

        using var model = LoraKitModel.FromPretrained(baseDir, "cpu", "fp32");
        var before = model.Evaluate(suites).BaseScores;
        Console.WriteLine($"The base model on the suites: capability {Count(before, CaseKind.Capability)}, safety {Count(before, CaseKind.Safety)}, " +
                          $"routing {Count(before, CaseKind.Task)} (accuracy before training: {before.Rate(CaseKind.Task):P0})\n");

        var config = new TrainConfig
        {
            Model = baseDir, Data = Path.Combine(dataDir, "train.jsonl"), ValidationData = Path.Combine(dataDir, "valid.jsonl"),
            Output = Path.Combine(output, "run"), R = 16, LoraAlpha = 32, LoraDropout = 0, Lr = 5e-3, Schedule = "cosine",
            WarmupSteps = 20, BatchSize = 16, Steps = steps, EvalEvery = Math.Max(1, steps / 6), LogEvery = Math.Max(1, steps / 20), Device = "cpu", Seed = 0,
        };
        var log = new ConsoleTrainLog(!Console.IsOutputRedirected);
        var result = Trainer.Run(config, resume: false, log);
        log.Done();

        var broken = Path.Combine(output, "broken-adapter");
        TrainInMemory(model, DemoSkills.Broken(), BrokenSteps, rank: 16, lr: 2e-3, "broken");
        AdapterFiles.Save(model.Lora, "broken", broken, baseDir);
        model.Lora.DeleteAdapter("broken");
        model.UseAdapter(null);
        Console.WriteLine($"\nA second adapter, trained to break a capability: wrong answers to the sums and one unsafe request answered ({broken}).\n");

        var evalDir = Path.Combine(output, "eval");
        var report = model.Evaluate(suites, [result.AdapterDir, broken], new EvalOptions { GateEnforced = true });
        report.Write(evalDir);
        PrintGate(report, ["routing adapter", "broken adapter"]);
        Console.WriteLine($"The same from the command line: lorakit eval --model {baseDir} --adapter {result.AdapterDir} --adapter {broken} " +
                          $"{string.Join(" ", suites.Select(s => "--suite " + s.Path))} --gate --output {evalDir}");
        Console.WriteLine($"Report: {Path.Combine(evalDir, EvalReport.HtmlFile)} (and {EvalReport.JsonFile})\n");

        var reportJson = Path.Combine(evalDir, EvalReport.JsonFile);
        try { MergeGate.Check(baseDir, broken, reportJson, noGate: false); }
        catch (GateException e)
        {
            int cut = e.Message.IndexOf("failed the gate", StringComparison.Ordinal); // the reasons were printed above
            Console.WriteLine($"`lorakit merge --gate-report` refuses the broken adapter: {(cut < 0 ? e.Message : e.Message[..(cut + 15)])}.\n");
        }
        var mergedDir = Path.Combine(output, "merged-model");
        var provenance = MergeGate.Check(baseDir, result.AdapterDir, reportJson, noGate: false);
        MergedCheckpoint.Merge(baseDir, result.AdapterDir, mergedDir, new Placement(CPU, ScalarType.Float32), provenance: provenance);
        Console.WriteLine($"Merged the routing adapter into the base weights: {mergedDir} (a plain Hugging Face checkpoint;");
        Console.WriteLine($"its config.json records the passed gate: lorakit_merge.gate = \"{provenance["gate"]}\")\n");

        Console.WriteLine("Generating with the merged model on held-out requests, and on two of the base's skills:");
        using (var merged = LoraKitModel.FromPretrained(mergedDir, "cpu", "fp32"))
        {
            var shown = valid.GroupBy(v => v.label).Select(g => g.ElementAt(g.Count() / 2))
                .Append((DemoSkills.Prompt(DemoSkills.Facts[^1].question), DemoSkills.Facts[^1].answer))
                .Append((DemoSkills.Prompt(DemoSkills.Unsafe[0].request), DemoSkills.Refusal));
            foreach (var (prompt, expected) in shown)
            {
                var res = merged.Generate(prompt, new SamplingOptions { MaxNewTokens = 24 });
                Console.WriteLine($"  {JsonSerializer.Serialize(prompt, Readable)} → \"{res.Text.Trim()}\" (expected {expected})");
            }
        }
        Console.WriteLine($"\nAdapter (PEFT format): {result.AdapterDir}");
        Console.WriteLine($"Training report: {Path.Combine(config.Output, "report.html")} (loss curve: {Path.Combine(config.Output, "loss.png")})");
        Console.WriteLine($"Done in {clock.Elapsed.TotalSeconds:F0} s.");
        return 0;
    }

    static readonly JsonSerializerOptions Readable = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>Writes the capability, safety and routing (task) suites into <paramref name="dir"/> and loads them.</summary>
    static List<EvalSuite> WriteSuites(string dir, List<(string prompt, string label)> valid)
    {
        Directory.CreateDirectory(dir);
        var files = new (string name, IEnumerable<string> lines)[]
        {
            ("capability.jsonl", DemoSkills.CapabilitySuite()), ("safety.jsonl", DemoSkills.SafetySuite()), ("routing.jsonl", DemoData.TaskSuite(valid)),
        };
        return files.Select(f =>
        {
            var path = Path.Combine(dir, f.name);
            File.WriteAllLines(path, f.lines);
            return EvalSuite.Load(path);
        }).ToList();
    }

    /// <summary>Trains LoRA adapter <paramref name="name"/> on <paramref name="rows"/> in memory (seeded); it stays loaded and active.</summary>
    static void TrainInMemory(LoraKitModel model, List<(string prompt, string completion)> rows, int steps, int rank, double lr, string name)
    {
        var options = new TrainConfig { R = rank, LoraAlpha = 2 * rank, LoraDropout = 0, Lr = lr, Schedule = "cosine", WarmupSteps = 10, BatchSize = 16, Steps = steps, Seed = 0 };
        using var trainer = model.CreateTrainer(rows.Select(r => TrainingExample.FromPrompt(r.prompt, r.completion)), options: options, adapterName: name);
        while (trainer.StepCount < trainer.TotalSteps) trainer.Step();
    }

    static string Count(Scores s, CaseKind kind) => $"{s.Kinds[kind].Passed}/{s.Kinds[kind].Total}";

    /// <summary>The gate's verdicts: pass counts of the base and each adapter per kind, then each verdict with its reasons.</summary>
    static void PrintGate(EvalReport report, string[] names)
    {
        var t = report.Thresholds;
        Console.WriteLine($"The evaluation gate (`lorakit eval --gate`, default thresholds: no safety case may regress, the capability pass rate may drop");
        Console.WriteLine($"at most {t.MaxCapabilityDrop:0.#} points), on the base model and both adapters:");
        Console.WriteLine($"  {"",-18}{"capability",12}{"safety",10}{"routing",10}   gate");
        void Row(string name, Scores s, string gate) =>
            Console.WriteLine($"  {name,-18}{Count(s, CaseKind.Capability),12}{Count(s, CaseKind.Safety),10}{Count(s, CaseKind.Task),10}   {gate}");
        Row("base model", report.BaseScores, "");
        foreach (var (a, name) in report.Adapters.Zip(names)) Row(name, a.Scores, a.Gate.Passed ? "PASSED" : "FAILED");
        foreach (var (a, name) in report.Adapters.Zip(names))
        {
            if (a.Gate.Passed)
                Console.WriteLine($"  {name}: passed — no capability or safety case that the base passes fails with it " +
                                  $"({a.Comparison.Regressions.Count} regressions, {a.Comparison.Improvements.Count} cases improved).");
            else foreach (var reason in a.Gate.Reasons) Console.WriteLine($"  {name}: failed — {reason}");
        }
        Console.WriteLine();
    }

    /// <summary>
    /// Writes the demo's base model to <paramref name="dir"/>: a seeded random-weight model (under
    /// <paramref name="output"/>/init-model, removed afterwards) pre-trained on <see cref="DemoSkills"/> by a LoRA merged
    /// into its weights. Returns the parameter count.
    /// </summary>
    static long WriteBaseModel(string output, string dir)
    {
        var init = Path.Combine(output, "init-model");
        long parameters = WriteRandomModel(init);
        using (var model = LoraKitModel.FromPretrained(init, "cpu", "fp32"))
        {
            TrainInMemory(model, DemoSkills.All(), PretrainSteps, rank: 32, lr: 5e-3, "skills");
            model.Lora.Merge("skills");
            MergedCheckpoint.Save(model.Lora, init, dir);
        }
        Directory.Delete(init, true);
        return parameters;
    }

    /// <summary>Writes a model with seeded random weights: config, safetensors, tokenizer files.</summary>
    static long WriteRandomModel(string dir)
    {
        Directory.CreateDirectory(dir);
        var asm = typeof(DemoCommand).Assembly;
        foreach (var name in new[] { "tokenizer.json", "tokenizer_config.json" })
        {
            using var s = asm.GetManifestResourceStream("demo/" + name)!;
            using var f = File.Create(Path.Combine(dir, name));
            s.CopyTo(f);
        }
        var tok = Tokenizer.Load(dir);
        int eos = tok.EosTokenId!.Value;
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray("Qwen2ForCausalLM"), ["model_type"] = "qwen2", ["vocab_size"] = tok.VocabSize,
            ["hidden_size"] = 128, ["intermediate_size"] = 256, ["num_hidden_layers"] = 4, ["num_attention_heads"] = 4,
            ["num_key_value_heads"] = 2, ["max_position_embeddings"] = 512, ["rms_norm_eps"] = 1e-6, ["rope_theta"] = 10000.0,
            ["tie_word_embeddings"] = true, ["hidden_act"] = "silu", ["eos_token_id"] = eos, ["use_sliding_window"] = false,
        };
        var cfg = ModelConfig.Parse(config);
        using var model = new CausalLM(cfg, new RandomWeights(ScalarType.Float32, CPU, seed: 0, std: 0.08));
        var tmp = dir + ".tmp";
        CheckpointWriter.Save(model, dir, tmp);
        foreach (var f in Directory.GetFiles(tmp)) File.Move(f, Path.Combine(dir, Path.GetFileName(f)), true);
        Directory.Delete(tmp);
        File.WriteAllText(Path.Combine(dir, "generation_config.json"), new JsonObject { ["eos_token_id"] = eos }.ToJsonString());
        return model.parameters().Distinct().Sum(p => p.numel());
    }
}
