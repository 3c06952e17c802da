using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Serving;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Diagnostics;

/// <summary>
/// GPU checks of the serving engine's fast path: decode steps replayed as CUDA graphs over the paged-attention kernel
/// and the gathered LoRA stacks must give each request its solo greedy tokens (TextGenerator, the reference) in fp32,
/// with adapters mixed in one batch; and in bf16 the graph replay must equal the same engine decoding eagerly. Run by
/// <c>lorakit check-kernels --model DIR</c> and the GPU tests.
/// </summary>
public static class ServingChecks
{
    static readonly string[] Prompts = ["Hello, world! How are", "def forward(x):", "Numbers like 12345", "The quick brown fox", "reset my password",
        "Low-rank adapters", "my invoice is wrong and", "Customers ask about", "a", "Once upon a time"];

    public static List<KernelChecks.Result> GraphDecode(string dir, Device dev)
    {
        var results = new List<KernelChecks.Result>();
        var tok = Tokenizer.Load(dir);
        var adapterRoot = Path.Combine(dir, "..", "..", "adapters", Path.GetFileName(Path.GetFullPath(dir)));
        var names = new[] { "a", "b" }.Where(n => Directory.Exists(Path.Combine(adapterRoot, n))).ToArray();
        var adapters = Enumerable.Range(0, Prompts.Length).Select(i => i % 3 == 0 || names.Length == 0 ? null : names[i % names.Length]).ToArray();
        var maxNew = Enumerable.Range(0, Prompts.Length).Select(i => 6 + 3 * i).ToArray();

        var expected = Solo(dir, tok, dev, names, adapterRoot, adapters, maxNew);
        var (graphed, stats) = Served(dir, tok, dev, ScalarType.Float32, names, adapterRoot, adapters, maxNew, graphs: true);
        int same = Enumerable.Range(0, Prompts.Length).Count(i => expected[i].SequenceEqual(graphed[i]));
        results.Add(new(same == Prompts.Length && stats.Replays > 0 && stats.Disabled is null,
            $"serving fp32, graphs + paged kernel + gathered LoRA ({string.Join("/", names.Prepend("base"))} mixed): {same}/{Prompts.Length} requests equal their solo greedy tokens; " +
            $"{stats.Replays} replays, {stats.Captures} captures{(stats.Disabled is { } d ? $", graphs disabled: {d}" : "")}"));

        var baseOnly = new string?[Prompts.Length];
        var (eager, _) = Served(dir, tok, dev, ScalarType.BFloat16, [], adapterRoot, baseOnly, maxNew, graphs: false);
        var (replayed, s2) = Served(dir, tok, dev, ScalarType.BFloat16, [], adapterRoot, baseOnly, maxNew, graphs: true);
        int equal = Enumerable.Range(0, Prompts.Length).Count(i => eager[i].SequenceEqual(replayed[i]));
        results.Add(new(equal == Prompts.Length && s2.Replays > 0,
            $"serving bf16, graph replay vs the same engine eager: {equal}/{Prompts.Length} requests give identical tokens ({s2.Replays} replays)"));
        return results;
    }

    /// <summary>The gathered-LoRA kernel (BGMV shrink/expand) against the gather-and-bmm reference, rows of mixed slots and ranks.</summary>
    public static List<KernelChecks.Result> GatheredLora(Device dev)
    {
        var results = new List<KernelChecks.Result>();
        if (!Runtime.Cuda.LoraGatherKernels.Usable(dev)) return [new(false, "gathered LoRA kernel: not available on this machine")];
        using var gen = new Generator(11);
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
            foreach (var (n, inF, outF, r) in new[] { (1, 64, 48, 8), (32, 2048, 8192, 16), (7, 8192, 2048, 64) })
            {
                using var scope = NewDisposeScope();
                var x = randn([n, inF], generator: gen).to(dtype).to(dev);
                var a = (randn([9, r, inF], generator: gen) * 0.05).to(dtype).to(dev);
                var b = (randn([9, outF, r], generator: gen) * 0.05).to(dtype).to(dev);
                using (no_grad()) { a[0].zero_(); b[0].zero_(); }      // slot 0 is the base model's: zero in every stack
                var slots = tensor(Enumerable.Range(0, n).Select(i => (long)(i * 5 % 9)).ToArray()).to(dev); // slot 0 among them
                var y0 = randn([n, outF], generator: gen).to(dtype).to(dev);
                var lora = x.to(ScalarType.Float32).unsqueeze(1).bmm(a.index_select(0, slots).to(ScalarType.Float32).transpose(1, 2))
                    .bmm(b.index_select(0, slots).to(ScalarType.Float32).transpose(1, 2)).squeeze(1);
                var expected = y0.to(ScalarType.Float32) + lora;
                var y = y0.clone();
                long before = Runtime.Cuda.LoraGatherKernels.Launches;
                Runtime.Cuda.LoraGatherKernels.AddInPlace(x, a, b, slots, y);
                double err = (y.to(ScalarType.Float32) - expected).abs().max().item<float>() / Math.Max(1e-12, expected.abs().max().item<float>());
                double tol = dtype == ScalarType.Float32 ? 1e-4 : 1e-2;
                results.Add(new(err <= tol && Runtime.Cuda.LoraGatherKernels.Launches == before + 1,
                    $"gathered LoRA kernel {dtype} n={n} {inF}->{outF} r={r}: max error {err:0.0e+0} of the output range (tolerance {tol:0e+0})"));
            }
        return results;
    }

    static List<int[]> Solo(string dir, Tokenizer tok, Device dev, string[] names, string root, string?[] adapters, int[] maxNew)
    {
        using var solo = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, dev));
        foreach (var n in names) AdapterFiles.Load(solo, n, Path.Combine(root, n));
        var gen = new TextGenerator(solo.Model, tok);
        var outs = new List<int[]>();
        for (int i = 0; i < Prompts.Length; i++)
        {
            if (adapters[i] is string a) { solo.SetDisabled(false); solo.SetActive(a); } else solo.SetDisabled(true);
            outs.Add(gen.Generate(tok.Encode(Prompts[i]), new SamplingOptions { MaxNewTokens = maxNew[i], EosTokenIds = [] }).OutputIds);
        }
        return outs;
    }

    static (List<int[]>, (long Replays, long Captures, string? Disabled)) Served(string dir, Tokenizer tok, Device dev, ScalarType dtype, string[] names, string root,
        string?[] adapters, int[] maxNew, bool graphs)
    {
        using var lm = new LoraModel(CausalLM.Load(dir, dtype, dev));
        foreach (var n in names) AdapterFiles.Load(lm, n, Path.Combine(root, n));
        lm.SetActive();
        using var engine = new InferenceEngine(lm, tok, new EngineOptions { MaxBatch = 8, CudaGraphs = graphs, KvCacheMemory = 0.5 });
        var tasks = Enumerable.Range(0, Prompts.Length).Select(i =>
            engine.GenerateAsync(tok.Encode(Prompts[i]), adapters[i], new SamplingOptions { MaxNewTokens = maxNew[i], EosTokenIds = [] })).ToArray();
        Task.WaitAll(tasks);
        var stats = engine.GraphStats ?? (0, 0, "not on CUDA");
        return (tasks.Select(t => t.Result.OutputIds).ToList(), stats);
    }
}
