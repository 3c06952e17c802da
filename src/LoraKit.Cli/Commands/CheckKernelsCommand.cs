using System.CommandLine;
using LoraKit.Diagnostics;
using LoraKit.Runtime;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit check-kernels</c> (GPU): prints <see cref="KernelChecks"/> (the fused CUDA kernels against the TorchSharp
/// path they replace, then a whole fast-path training step of each given model), the dequantization and paged-attention
/// kernels against their references (<see cref="PagedAttentionChecks"/>, with its timings), one ok/FAIL line per check. Exit code 1
/// when any check fails. The same checks run as xunit tests on the GPU machine (scripts/gpu/run_gpu_tests.sh).
/// </summary>
public static class CheckKernelsCommand
{
    public static Command Build()
    {
        var models = new Option<string[]>("--model") { Description = "model directories for the whole-step check", AllowMultipleArgumentsPerToken = true };
        var data = new Option<string?>("--data") { Description = "JSONL for the whole-step check (default: fixtures/training/data.jsonl)" };
        var cmd = new Command("check-kernels", "Check the fused CUDA kernels against the plain path (forward and gradients, bf16).") { models, data };
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var dev = Devices.Resolve("cuda");
            bool ok = true;
            void Print(IEnumerable<KernelChecks.Result> results)
            {
                foreach (var result in results)
                {
                    Console.WriteLine(result);
                    ok &= result.Pass;
                }
            }
            Print(KernelChecks.Kernels(dev));
            string jsonl = r.GetValue(data) ?? Path.Combine("fixtures", "training", "data.jsonl");
            Print(DequantKernelChecks.Exactness(dev));
            Print([DequantKernelChecks.Bandwidth(dev)]);
            Print(ServingChecks.GatheredLora(dev));
            Print(PagedAttentionChecks.Exactness(dev));          // the serving engine's decode attention (issue 21)
            Print(PagedAttentionChecks.CudaGraphReplay(dev));
            Print(PagedAttentionChecks.Timing(dev));
            foreach (var dir in r.GetValue(models) ?? [])
            {
                Print(KernelChecks.TrainingStep(dir, jsonl, dev));
                Print(KernelChecks.TrainingStep(dir, jsonl, dev, new Quantization.BnbQuantizeOptions("nf4"))); // QLoRA: W dequantized per GEMM
                Print(ServingChecks.GraphDecode(dir, dev)); // serving: graph decode and paged kernel against solo generation
            }
            Console.WriteLine(ok ? "all kernel checks passed" : "kernel checks FAILED");
            return ok ? 0 : 1;
        }));
        return cmd;
    }
}
