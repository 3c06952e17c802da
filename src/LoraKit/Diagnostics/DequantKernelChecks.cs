using System.Diagnostics;
using LoraKit.Accelerated;
using LoraKit.Models;
using LoraKit.Quantization;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Diagnostics;

/// <summary>
/// GPU checks of the dequantization kernel (<see cref="DequantKernels"/>, swapped in by <see cref="KernelPackedWeights"/>)
/// against the reference ops of <see cref="Blockwise4Bit"/> and <see cref="Int8RowWise"/>: the kernel must give the same
/// values (equal, NaN where the reference has NaN) for NF4 and FP4 (double quantization on and off, several block sizes, element counts that end in a partial
/// block or an odd nibble) and int8, into fp32, bf16 and fp16. Also measures the kernel's bandwidth on an 8B-model MLP
/// weight (reported, not asserted: timings do not belong in pass/fail checks). Run by the GPU tests and
/// <c>lorakit check-kernels</c>.
/// </summary>
public static class DequantKernelChecks
{
    static readonly long[][] Shapes = [[64, 64], [37, 24], [3, 5], [256, 1000]];

    /// <summary>One result per (method, layout, dtype), each comparing every shape bit for bit.</summary>
    public static List<KernelChecks.Result> Exactness(Device dev)
    {
        var results = new List<KernelChecks.Result>();
        if (!DequantKernels.Usable(dev)) throw new InvalidOperationException("the CUDA dequantization kernels did not load on this machine");
        using var gen = new Generator(5);
        var cases = new List<BnbQuantizeOptions>();
        foreach (var method in new[] { "nf4", "fp4" })
            foreach (bool nested in new[] { true, false })
                foreach (int bs in new[] { 64, 128 })
                    cases.Add(new BnbQuantizeOptions(method, nested, bs));
        cases.Add(new BnbQuantizeOptions("int8"));
        foreach (var o in cases)
            foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
            {
                using var scope = NewDisposeScope();
                long differing = 0, total = 0, launches = DequantKernels.Launches;
                foreach (var shape in Shapes)
                {
                    var w = (randn(shape, ScalarType.Float32, generator: gen) * 0.05).to(dev);
                    using var reference = PackedWeight.Quantize(w, o);
                    var fast = FastTwin(reference);
                    var expected = reference.Dequantize(dtype);
                    var actual = fast.Dequantize(dtype);
                    differing += actual.eq(expected).logical_or(actual.isnan().logical_and(expected.isnan())).logical_not().sum().item<long>();
                    total += expected.numel();
                }
                string name = o.Method == "int8" ? "int8" : QuantizedBase.Describe(o);
                launches = DequantKernels.Launches - launches;
                results.Add(new(differing == 0 && launches == Shapes.Length,
                    $"dequantize {name} into {dtype}: {differing} of {total} values differ from the reference ops ({launches} kernel launches for {Shapes.Length} weights)"));
            }
        return results;
    }

    /// <summary>The kernel-backed twin of a reference packed weight (over the same buffers).</summary>
    static PackedWeight FastTwin(PackedWeight reference) => KernelPackedWeights.KernelTwin(reference)!;

    /// <summary>
    /// Achieved bandwidth of the 4-bit kernel (NF4, double quantization, into bf16) on a [14336, 4096] weight (llama-8b's
    /// MLP): bytes read (codes, absmax) plus written (bf16), per second, against the device's copy rate measured the same
    /// way (a device-to-device copy of the bf16 output).
    /// </summary>
    public static KernelChecks.Result Bandwidth(Device dev, int iterations = 50)
    {
        using var scope = NewDisposeScope();
        var w = randn([14336, 4096], ScalarType.BFloat16, dev) * 0.02;
        using var reference = PackedWeight.Quantize(w, new BnbQuantizeOptions("nf4"));
        var fast = FastTwin(reference);
        long launches = DequantKernels.Launches;
        double seconds = Time(() => fast.Dequantize(ScalarType.BFloat16).Dispose(), iterations, dev);
        bool ran = DequantKernels.Launches - launches == iterations + 1;
        long bytes = reference.StorageBytes + w.numel() * 2;
        var dst = empty_like(w);
        double copySeconds = Time(() => dst.copy_(w), iterations, dev);
        double gbs = bytes / seconds / 1e9, copyGbs = 2.0 * w.numel() * 2 / copySeconds / 1e9;
        return new(ran, $"dequantize bandwidth (nf4 + double quant → bf16, [14336, 4096]): {gbs:F0} GB/s read + written, " +
                         $"{seconds * 1e6:F0} µs per weight; a device copy of the bf16 weight moves {copyGbs:F0} GB/s ({gbs / copyGbs:P0} of it)");
    }

    static double Time(Action a, int iterations, Device dev)
    {
        a();
        cuda.synchronize(dev);
        var clock = Stopwatch.StartNew();
        for (int i = 0; i < iterations; i++) a();
        cuda.synchronize(dev);
        return clock.Elapsed.TotalSeconds / iterations;
    }
}
