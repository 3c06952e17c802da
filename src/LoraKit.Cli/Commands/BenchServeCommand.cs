using System.CommandLine;
using System.Diagnostics;
using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Serving;
using LoraKit.Tokenization;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit bench-serve</c>: the serving engine under a load of N requests submitted at once, spread uniformly over K
/// adapters (random, r=16 on all seven linear modules) or none (K = 0: the base, what a merged model costs). Adapters
/// go through the server's own <see cref="AdapterRegistry"/>: the first few are distinct adapter directories, the rest
/// symlinks to them (distinct names, so each is read, held in host memory and loaded onto the device like any other).
/// Prints one JSON line: tokens/s, and time to first token and per output token (p50, p99, nearest rank) measured from
/// submission. Used by bench/run_serve_bench.sh on the GPU machine.
/// </summary>
public static class BenchServeCommand
{
    public static Command Build()
    {
        var model = new Option<string>("--model") { Description = "model directory (tokenizer.json needed)", Required = true };
        var adapters = new Option<int>("--adapters") { Description = "distinct adapter names (0 = the base model)", DefaultValueFactory = _ => 8 };
        var requests = new Option<int>("--requests") { Description = "requests submitted at once", DefaultValueFactory = _ => 64 };
        var maxTokens = new Option<int>("--max-tokens") { Description = "tokens generated per request", DefaultValueFactory = _ => 64 };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "prompt length", DefaultValueFactory = _ => 128 };
        var maxBatch = new Option<int>("--max-batch") { Description = "engine batch limit", DefaultValueFactory = _ => 32 };
        var device = new Option<string>("--device") { Description = "auto, cpu or cuda", DefaultValueFactory = _ => "auto" };
        var maxGpu = new Option<int>("--max-gpu-adapters") { Description = "adapters on the device at once", DefaultValueFactory = _ => 32 };
        var maxCpu = new Option<int>("--max-cpu-adapters") { Description = "adapters held in host memory", DefaultValueFactory = _ => 1000 };
        var kv = new Option<double>("--kv-cache-memory") { Description = "KV cache: fraction of free device memory (≤ 1) or GiB", DefaultValueFactory = _ => 0.9 };
        var budget = new Option<int>("--max-tokens-per-step") { Description = "tokens per engine step", DefaultValueFactory = _ => 2048 };
        var noGraphs = new Option<bool>("--no-cuda-graphs") { Description = "decode eagerly" };
        var load = new Option<string?>("--load") { Description = "a label copied into the JSON line" };
        var cmd = new Command("bench-serve", "Measure multi-adapter serving throughput and latency (for bench/run_serve_bench.sh).")
            { model, adapters, requests, maxTokens, promptTokens, maxBatch, device, maxGpu, maxCpu, kv, budget, noGraphs, load };
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var (dev, dtype) = Placement.Resolve(r.GetValue(device)!);
            var dir = ModelArgument.Resolve(r.GetValue(model)!);
            var lm = new LoraModel(CausalLM.Load(dir, dtype, dev));
            int k = r.GetValue(adapters), n = r.GetValue(requests), p = r.GetValue(promptTokens), t = r.GetValue(maxTokens);
            var root = k > 0 ? WriteAdapters(lm, k) : null;
            var options = new EngineOptions { MaxBatch = r.GetValue(maxBatch), KvCacheMemory = r.GetValue(kv), MaxTokensPerStep = r.GetValue(budget), CudaGraphs = !r.GetValue(noGraphs) };
            using var engine = new InferenceEngine(lm, Tokenizer.Load(dir), options);
            var registry = root is null ? null : new AdapterRegistry(engine, root, r.GetValue(maxGpu)) { MaxHostAdapters = r.GetValue(maxCpu), SlotWait = TimeSpan.FromMinutes(10) };
            // In host memory before the clock starts: every adapter the load will ask for (up to --max-cpu-adapters).
            if (registry is not null)
                foreach (var name in Names(Math.Min(Math.Min(k, n), r.GetValue(maxCpu)))) registry.PrefetchAsync(name).GetAwaiter().GetResult();
            var rng = new Random(0);
            int vocab = lm.Model.Config.VocabSize;
            int[] Prompt(int len) => Enumerable.Range(0, len).Select(_ => rng.Next(vocab)).ToArray();
            string? AdapterOf(int i) => k > 0 ? $"ad{i % k}" : null;
            // Warm-up: a full batch of prompts of the load's length (kernels compiled and chosen for its prefill shapes,
            // graphs captured for the buckets used).
            Run(engine, registry, Enumerable.Range(0, options.MaxBatch).Select(i => (Prompt(p), AdapterOf(i))).ToList(), 8);
            var load1 = Enumerable.Range(0, n).Select(i => (Prompt(p), AdapterOf(i))).ToList();
            var clock = Stopwatch.StartNew();
            var results = Run(engine, registry, load1, t);
            double secs = clock.Elapsed.TotalSeconds;
            long generated = results.Sum(x => (long)x.Tokens);
            var ttft = results.Select(x => x.Ttft * 1000).ToList();
            var tpot = results.Select(x => x.Tpot * 1000).ToList();
            Console.WriteLine(CliJson.Serialize(new
            {
                system = "lorakit", load = r.GetValue(load), adapters = k, requests = n, prompt_tokens = p, new_tokens = t, batch = options.MaxBatch,
                generated_tokens = generated, seconds = Math.Round(secs, 3), tokens_per_s = Math.Round(generated / secs, 1),
                ttft_p50_ms = Pct(ttft, 50), ttft_p99_ms = Pct(ttft, 99), tpot_p50_ms = Pct(tpot, 50), tpot_p99_ms = Pct(tpot, 99),
                peak_batch = engine.PeakBatch, kv_blocks = engine.KvBlocks, steps = engine.Steps, mixed_steps = engine.MixedSteps,
                graph_replays = engine.GraphStats?.Replays, graph_captures = engine.GraphStats?.Captures, graphs_disabled = engine.GraphStats?.Disabled,
                adapter_device_hits = registry?.CacheStats.DeviceHits, adapter_host_hits = registry?.CacheStats.HostHits, adapter_reads = registry?.CacheStats.Reads,
            }));
            if (root is not null) Directory.Delete(root, recursive: true);
            return 0;
        }));
        return cmd;
    }

    sealed record Measured(int Tokens, double Ttft, double Tpot);

    /// <summary>Submits every request at once and waits for all; TTFT counts from submission (adapter waits included).</summary>
    static List<Measured> Run(InferenceEngine engine, AdapterRegistry? registry, List<(int[] Prompt, string? Adapter)> load, int newTokens)
    {
        var opts = new SamplingOptions { MaxNewTokens = newTokens };
        var t0 = Stopwatch.GetTimestamp();
        async Task<Measured> One(int[] prompt, string? adapter)
        {
            using var lease = adapter is null ? null : await registry!.AcquireAsync(adapter);
            double submitted = Stopwatch.GetElapsedTime(t0).TotalSeconds;
            var res = await engine.GenerateAsync(prompt, adapter, opts);
            var timing = res.Timing!;
            return new Measured(res.OutputIds.Length, submitted + timing.FirstTokenSeconds, timing.TimePerOutputToken);
        }
        var tasks = load.Select(x => Task.Run(() => One(x.Prompt, x.Adapter))).ToArray();
        Task.WaitAll(tasks);
        return tasks.Select(x => x.Result).ToList();
    }

    static double Pct(List<double> xs, int pct)
    {
        var s = xs.Order().ToList();
        int i = (int)Math.Ceiling(pct / 100.0 * s.Count) - 1; // nearest rank
        return Math.Round(s[Math.Clamp(i, 0, s.Count - 1)], 2);
    }

    static IEnumerable<string> Names(int k) => Enumerable.Range(0, k).Select(i => $"ad{i}");

    /// <summary>Eight distinct random adapters in a temporary directory, and symlinks to them for the other names.</summary>
    static string WriteAdapters(LoraModel lm, int k)
    {
        var root = Directory.CreateTempSubdirectory("lorakit-bench-adapters-").FullName;
        int distinct = Math.Min(k, 8);
        for (int i = 0; i < distinct; i++)
        {
            lm.AddAdapter("tmp", new LoraConfig { R = 16, LoraAlpha = 32, LoraDropout = 0, InitLoraWeights = "false",
                TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] }, seed: i);
            AdapterFiles.Save(lm, "tmp", Path.Combine(root, $"ad{i}"));
            lm.DeleteAdapter("tmp");
        }
        for (int i = distinct; i < k; i++) Directory.CreateSymbolicLink(Path.Combine(root, $"ad{i}"), $"ad{i % distinct}");
        lm.SetActive();
        return root;
    }
}
