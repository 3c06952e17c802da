using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// TorchSharp 0.107's implicitly created Scalars (<c>x + 1e-6</c>, the alpha of <c>a + b</c>) can be finalized while
/// libtorch still reads them. These tests run tensor–number arithmetic on several threads while another thread forces
/// collections and finalizers, and require every result to be right: ScalarOps must hold up where the operators fail.
/// The forced collections would also hit other tests' implicit Scalars, so this class runs alone.
/// </summary>
[Collection(Name)]
public class ScalarLifetimeTests
{
    public const string Name = "gc-pressure";

    /// <summary>Runs <paramref name="op"/> on 4 threads for <paramref name="seconds"/> under forced GCs; returns the failures seen.</summary>
    static List<string> UnderGcPressure(Func<Tensor, Tensor> op, float expected, double seconds)
    {
        var failures = new System.Collections.Concurrent.ConcurrentBag<string>();
        var stop = DateTime.UtcNow.AddSeconds(seconds);
        var gc = new Thread(() => { while (DateTime.UtcNow < stop) { GC.Collect(); GC.WaitForPendingFinalizers(); } });
        var workers = Enumerable.Range(0, 4).Select(_ => new Thread(() =>
        {
            while (DateTime.UtcNow < stop && failures.Count < 5)
            {
                try
                {
                    using var scope = NewDisposeScope();
                    var x = ones(8, dtype: ScalarType.Float32);
                    var y = op(x);
                    var got = y.data<float>().ToArray();
                    if (got.Any(v => Math.Abs(v - expected) > 1e-5f)) failures.Add($"value {got[0]} (expected {expected})");
                }
                catch (Exception e) { failures.Add(e.Message.Split('\n')[0]); }
            }
        })).ToList();
        gc.Start();
        workers.ForEach(t => t.Start());
        workers.ForEach(t => t.Join());
        gc.Join();
        return failures.ToList();
    }

    // The proof behind ScalarOps (2026-12-01: fails every run within 5 s with "Expected false to be true" from
    // c10::Scalar::toFloat and "Unknown scalar type"); skipped because a freed Scalar can also crash the test host.
    [Fact(Skip = "proof only: TorchSharp's operators fail under GC pressure and may crash the process; run by hand")]
    public void ImplicitScalarsFailUnderGcPressure()
    {
        var failures = UnderGcPressure(x => (x + 0.25) * 2.0 + x, 3.5f, 5);
        Assert.True(failures.Count == 0, string.Join(" | ", failures));
    }

    [Fact]
    public void ScalarOpsSurviveGcPressure()
    {
        var failures = UnderGcPressure(x => x.Plus(0.25).Times(2.0).Plus(x), 3.5f, 3);
        Assert.True(failures.Count == 0, string.Join(" | ", failures));
    }
}

/// <summary>Runs the GC-pressure tests after the parallel ones, alone.</summary>
[CollectionDefinition(ScalarLifetimeTests.Name, DisableParallelization = true)]
public class GcPressureCollection;
