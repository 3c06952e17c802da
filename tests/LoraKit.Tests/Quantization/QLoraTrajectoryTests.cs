using System.Text.Json.Nodes;
using LoraKit.IO;

namespace LoraKit.Tests.Quantization;

/// <summary>
/// The 3-step QLoRA trajectory of issue 20: <c>lorakit train</c> on the NF4 checkpoint fixtures/reference/quant/llama-nf4,
/// kept packed and dequantized per forward, matches PEFT + torch AdamW on the same checkpoint's dequantized weights
/// (scripts/fixtures/make_qlora_trajectory.py): per-step losses within 1e-4 of PEFT's fp32 run, the final adapter within
/// 5e-3 (see the comment below: open), with each tensor's distance from the exact fp64 run reported.
/// </summary>
public class QLoraTrajectoryTests
{
    [Fact]
    public void ReproducesPeftAdamWOnTheDequantizedWeights()
    {
        var reference = Fixtures.Path_("reference", "quant", "qlora-trajectory.safetensors");
        Assert.True(File.Exists(reference), $"{reference} is missing: run python3 scripts/fixtures/make_qlora_trajectory.py (torch 2.11, transformers 5.17, peft 0.21)");
        var output = Path.Combine(Fixtures.TempDir(), "qlora-trajectory");
        var (code, _, stderr) = CliTests.RunCli("train", "--model", Fixtures.Path_("reference", "quant", "llama-nf4"),
            "--data", Fixtures.Path_("training", "data.jsonl"), "--output", output, "--device", "cpu", "--dtype", "fp32",
            "--init-adapter", Fixtures.Path_("adapters", "llama", "a"), "--lr", "1e-3", "--batch-size", "2", "--steps", "3",
            "--schedule", "constant", "--warmup-steps", "0", "--weight-decay", "0", "--max-grad-norm", "0", "--no-shuffle", "--no-eos",
            "--train-on-all-tokens", "--seed", "0", "--registry", Path.Combine(Fixtures.TempDir(), "registry"));
        Assert.True(code == 0, stderr);
        using var peft = SafetensorsFile.Open(reference);
        var expected = peft.Read("losses").data<double>().ToArray();
        var losses = File.ReadLines(Path.Combine(output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).Where(n => n["loss"] != null)
            .Select(n => n["loss"]!.GetValue<double>()).ToArray();
        Assert.Equal(expected.Length, losses.Length);
        for (int i = 0; i < expected.Length; i++)
            Assert.True(Math.Abs(losses[i] - expected[i]) <= 1e-4 * Math.Abs(expected[i]), $"step {i + 1}: {losses[i]} vs PEFT {expected[i]}");
        using var mine = SafetensorsFile.Open(Path.Combine(output, "adapter", "adapter_model.safetensors"));
        Assert.True(mine.Metadata.ContainsKey(LoraKit.Quantization.BnbQuantizeOptions.AdapterMetadataKey), "the adapter does not record its quantized base");
        // The adapter: within 5e-3 of PEFT's fp32 run (most tensors 1e-5..1e-4; layer 0's gate_proj lora_A 2e-3). OPEN
        // (issue 20 notes): against the exact trajectory (the same run in fp64, qlora-trajectory-fp64) PEFT's fp32 run is
        // ~30x closer than LoraKit's on every tensor, and LoraKit's dense run on the dequantized checkpoint gives the very
        // same adapter as this packed run, so the gap is in the shared training path, not in the quantized base.
        using var exact = SafetensorsFile.Open(Fixtures.Path_("reference", "quant", "qlora-trajectory-fp64.safetensors"));
        var report = new List<string>();
        foreach (var key in mine.Entries.Keys)
        {
            var peftKey = key.Replace(".lora_A.weight", ".lora_A.default.weight").Replace(".lora_B.weight", ".lora_B.default.weight");
            double vsPeft = Close.RelError(mine.Read(key), peft.Read(peftKey));
            report.Add($"{key}: vs PEFT fp32 {vsPeft:E2}; from exact: LoraKit {Close.RelError(mine.Read(key), exact.Read(peftKey)):E2}, PEFT fp32 {Close.RelError(peft.Read(peftKey), exact.Read(peftKey)):E2}");
            Assert.True(vsPeft <= 5e-3, report[^1]);
        }
        Console.Error.WriteLine(string.Join("\n", report));
    }
}
