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
/// <c>lorakit bench-serve</c>: decode throughput of the serving engine with N concurrent requests spread over K distinct
/// adapters (random, r=16 on all seven linear modules), or over none (K = 0: the cost of a single merged model).
/// Used by bench/run_serve_bench.sh on the GPU machine.
/// </summary>
public static class BenchServeCommand
{
    public static Command Build()
    {
        var model = new Option<string>("--model") { Description = "model directory (tokenizer.json needed)", Required = true };
        var adapters = new Option<int>("--adapters") { Description = "distinct adapters (0 = plain/merged model)", DefaultValueFactory = _ => 8 };
        var requests = new Option<int>("--requests") { Description = "concurrent requests", DefaultValueFactory = _ => 64 };
        var maxTokens = new Option<int>("--max-tokens") { Description = "tokens generated per request", DefaultValueFactory = _ => 64 };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "prompt length", DefaultValueFactory = _ => 128 };
        var maxBatch = new Option<int>("--max-batch") { Description = "engine batch limit", DefaultValueFactory = _ => 32 };
        var device = new Option<string>("--device") { Description = "auto, cpu or cuda", DefaultValueFactory = _ => "auto" };
        var cmd = new Command("bench-serve", "Measure multi-adapter serving throughput (for bench/run_serve_bench.sh).") { model, adapters, requests, maxTokens, promptTokens, maxBatch, device };
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var (dev, dtype) = Placement.Resolve(r.GetValue(device)!);
            var dir = ModelArgument.Resolve(r.GetValue(model)!);
            var lm = new LoraModel(CausalLM.Load(dir, dtype, dev));
            int k = r.GetValue(adapters);
            for (int i = 0; i < k; i++)
                lm.AddAdapter($"ad{i}", new LoraConfig { R = 16, LoraAlpha = 32, LoraDropout = 0, InitLoraWeights = "false",
                    TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] }, seed: i);
            lm.SetActive();
            using var engine = new InferenceEngine(lm, Tokenizer.Load(dir), r.GetValue(maxBatch));
            var rng = new Random(0);
            int vocab = lm.Model.Config.VocabSize, n = r.GetValue(requests), p = r.GetValue(promptTokens), t = r.GetValue(maxTokens);
            var opts = new SamplingOptions { MaxNewTokens = t };
            engine.GenerateAsync(Enumerable.Range(0, 8).Select(_ => rng.Next(vocab)).ToArray(), k > 0 ? "ad0" : null, new SamplingOptions { MaxNewTokens = 4 }).Wait(); // warm-up
            var clock = Stopwatch.StartNew();
            var tasks = Enumerable.Range(0, n).Select(i => engine.GenerateAsync(Enumerable.Range(0, p).Select(_ => rng.Next(vocab)).ToArray(),
                k > 0 ? $"ad{i % k}" : null, opts)).ToArray();
            Task.WaitAll(tasks);
            double secs = clock.Elapsed.TotalSeconds;
            long generated = tasks.Sum(x => (long)x.Result.OutputIds.Length);
            Console.WriteLine(CliJson.Serialize(new { adapters = k, requests = n, prompt_tokens = p, generated_tokens = generated, seconds = Math.Round(secs, 3),
                tokens_per_s = Math.Round(generated / secs, 1), peak_batch = engine.PeakBatch }));
            return 0;
        }));
        return cmd;
    }
}
