using LoraKit.Accelerated;
using LoraKit.Data;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime.Cuda;
using LoraKit.Tokenization;
using LoraKit.Training;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Diagnostics;

/// <summary>
/// The GPU checks of the fused CUDA kernels against the TorchSharp path they replace, forward and gradients: RMSNorm,
/// the SwiGLU tail, RoPE and the chunked cross-entropy on random tensors of several widths, the host-mapped embedding
/// gather, then a whole fast-path LoRA training step of a model (eager, checkpointed, replayed from a CUDA graph, with
/// checkpoints offloaded). Each result is computed three ways: bf16 with the kernels, bf16 on the TorchSharp path, and
/// fp32 (the truth both bf16 paths approximate; max-element error per kernel, relative L2 for a whole step). A check
/// passes when the kernels' error against fp32 is within the bf16 tolerance (1e-2) or no worse than 1.25× the
/// TorchSharp path's own error. Run by the GPU tests ([CudaFact]) and by <c>lorakit check-kernels</c>; needs CUDA.
/// </summary>
public static class KernelChecks
{
    const double Tolerance = 1e-2;

    /// <summary>One check's outcome and its report line (without the ok/FAIL prefix).</summary>
    public sealed record Result(bool Pass, string Line)
    {
        public override string ToString() => $"{(Pass ? "ok  " : "FAIL")} {Line}";
    }

    /// <summary>Compares one computation run with the kernels, on the TorchSharp path, and in fp32 (see the class summary).</summary>
    static List<Result> Compare(string what, string[] names, Func<ScalarType, Tensor[]> run, bool l2 = false)
    {
        var results = new List<Result>();
        // Per-kernel checks use the max-element error; a whole step (rounding compounded through every layer of a
        // random model) uses the relative L2 error, which a few outlying elements do not dominate.
        Func<Tensor, Tensor, double> Rel = l2 ? RelL2 : RelMax;
        FusedKernels.Enabled = true;
        var on = run(ScalarType.BFloat16);
        FusedKernels.Enabled = false;
        var off = run(ScalarType.BFloat16);
        var truth = run(ScalarType.Float32);
        FusedKernels.Enabled = true;
        for (int i = 0; i < names.Length; i++)
        {
            double eOn = Rel(on[i], truth[i]), eOff = Rel(off[i], truth[i]);
            bool pass = !double.IsNaN(eOn) && (eOn <= Tolerance || eOn <= 1.25 * eOff);
            results.Add(new(pass, $"{what} {names[i]}: vs fp32, kernels {eOn:E2}, TorchSharp path {eOff:E2} (kernels vs path {Rel(on[i], off[i]):E2})"));
        }
        return results;
    }

    /// <summary>The per-kernel checks on random tensors (and the host-mapped embedding gather).</summary>
    public static List<Result> Kernels(Device dev)
    {
        var results = new List<Result>();
        FusedKernels.Enabled = true;
        if (!FusedKernels.Usable(ones(16, ScalarType.BFloat16, dev))) throw new InvalidOperationException("fused kernels did not load on this machine");
        manual_seed(0);
        foreach (long d in new long[] { 2048, 896, 128, 4096 })
        {
            var x = randn(3, 517, d, device: dev).Times(3).to(ScalarType.BFloat16);
            var w = randn(d, device: dev).Times(0.3).Plus(1).to(ScalarType.BFloat16);
            var dy = randn(3, 517, d, device: dev).to(ScalarType.BFloat16);
            results.AddRange(Compare($"rmsnorm D={d}", ["forward", "dx"], dt =>
            {
                var xi = x.detach().to(dt).requires_grad_(true);
                var y = RmsNormFunction.Apply(xi, w.to(dt), 1e-5);
                y.backward([dy.to(dt)]);
                return [y, xi.grad!];
            }));
        }
        foreach (long inter in new long[] { 8192, 4864 })
        {
            var g = randn(2, 333, inter, device: dev).TimesInPlace(2).to(ScalarType.BFloat16);
            var u = randn(2, 333, inter, device: dev).to(ScalarType.BFloat16);
            var down = new Models.Linear(new Parameter(randn(512, inter, device: dev).Times(0.02).to(ScalarType.BFloat16), false));
            var down32 = new Models.Linear(new Parameter(down.weight.to(ScalarType.Float32), false));
            var lora = new LoraWeights(new Parameter(randn(8, inter, device: dev).Times(0.02)), new Parameter(randn(512, 8, device: dev).Times(0.02)), 2.0, 0);
            var dy = randn(2, 333, 512, device: dev).to(ScalarType.BFloat16);
            results.AddRange(Compare($"swiglu-down I={inter}", ["forward", "d gate", "d up", "d lora_A", "d lora_B"], dt =>
            {
                // Copies: the fused backward writes its results over gate and up.
                var (gi, ui) = (g.to(dt).clone().requires_grad_(true), u.to(dt).clone().requires_grad_(true));
                lora.A.grad = null; lora.B.grad = null;
                var y = SwiGluDown.Apply(gi, ui, dt == ScalarType.BFloat16 ? down : down32, lora);
                y.backward([dy.to(dt)]);
                return [y, gi.grad!, ui.grad!, lora.A.grad!.clone(), lora.B.grad!.clone()];
            }));
        }
        foreach (var (heads, d) in new[] { (32L, 64L), (8L, 128L) })
        {
            var x = randn(2, 300, heads, d, device: dev).to(ScalarType.BFloat16);
            var angles = randn(2, 300, d / 2, device: dev).Times(3);
            var cos = cat([angles.cos(), angles.cos()], -1);
            var sin = cat([angles.sin(), angles.sin()], -1);
            var dy = randn(2, 300, heads, d, device: dev).to(ScalarType.BFloat16);
            var k = randn(2, 300, heads / 4, d, device: dev).to(ScalarType.BFloat16);
            var dk = randn(2, 300, heads / 4, d, device: dev).to(ScalarType.BFloat16);
            results.AddRange(Compare($"rope H={heads} D={d}", ["forward q", "forward k", "dq", "dk"], dt =>
            {
                var (qi, ki) = (x.detach().to(dt).requires_grad_(true), k.detach().to(dt).requires_grad_(true));
                var (yq, yk) = RopeFunction.Apply(qi, ki, cos.to(dt), sin.to(dt));
                autograd.backward([yq, yk], [dy.to(dt), dk.to(dt)]);
                return [yq, yk, qi.grad!, ki.grad!];
            }));
        }
        foreach (long vocab in new long[] { 32000, 128256 })
        {
            var hidden = randn(1500, 256, device: dev).to(ScalarType.BFloat16);
            var head = randn(vocab, 256, device: dev).Times(0.1).to(ScalarType.BFloat16);
            var targets = randint(0, vocab, [1500], dtype: ScalarType.Int64, device: dev);
            targets[TensorIndex.Slice(0, 1500, 7)] = tensor(-100L, device: dev); // ignored positions
            results.AddRange(Compare($"cross-entropy V={vocab}", ["loss", "d hidden"], dt =>
            {
                var hi = hidden.detach().to(dt).requires_grad_(true);
                var loss = ChunkedLmLoss.Compute(hi, head.to(dt), targets, 512);
                loss.backward();
                return [loss.detach(), hi.grad!];
            }));
        }
        {
            // The input embedding kept in host memory (--embeddings-on-host): rows gathered over PCIe by the kernel
            // must be index_select's rows on the GPU, bit for bit.
            var table = randn(5000, 4096, device: dev).to(ScalarType.BFloat16);
            var host = table.cpu();
            var ids = randint(0, 5000, [3, 700], dtype: ScalarType.Int64, device: dev);
            using var mapped = HostMappedMemory.TryMap(host, FusedKernels.Pointer(host), out var why);
            bool same = mapped != null && FusedKernels.GatherRows(mapped.Device, 5000, 4096, ScalarType.BFloat16, ids)
                .eq(table.index_select(0, ids.flatten()).view(3, 700, 4096)).all().item<bool>();
            results.Add(new(same, "embedding rows from host memory: " + (mapped is null ? $"not mapped ({why})" : same ? "equal to index_select on the GPU" : "differ from index_select")));
        }
        return results;
    }

    /// <summary>
    /// A whole fast-path training step of the model in <paramref name="dir"/> on the first rows of <paramref name="jsonl"/>:
    /// eager and checkpointed against fp32, from a CUDA graph against eager, with checkpoints offloaded against on the device.
    /// </summary>
    public static List<Result> TrainingStep(string dir, string jsonl, Device dev, Quantization.BnbQuantizeOptions? quantize = null)
    {
        var results = new List<Result>();
        var (samples, _) = JsonlDataset.Load(jsonl, Tokenizer.Load(dir), new DataOptions());
        using var batch = Batches.Collate(samples.Take(4).ToList(), 0, dev);
        // Also checkpointed: the lean replay (o/down GEMMs skipped, gate/up kept for every layer) inside backward;
        // then the same step replayed from a CUDA graph.
        foreach (bool ckpt in new[] { false, true })
            results.AddRange(Compare($"{Name(dir, quantize)} training step{(ckpt ? ", checkpointed" : "")}", ["loss", "LoRA grads"], dt =>
            {
                using var lm = FastTrainingModel(dir, dt, dev, ckpt, quantize);
                var loss = Eager(lm, batch);
                return [loss, cat(lm.Parameters("a").Select(p => p.param.grad!.flatten()).ToArray())];
            }, l2: true));
        foreach (bool ckpt in new[] { false, true }) results.Add(CheckGraph(dir, batch, ckpt, dev, quantize: quantize));
        results.Add(CheckGraph(dir, batch, true, dev, offload: true, quantize));
        results.Add(CheckOffload(dir, batch, dev, quantize));
        return results;
    }

    /// <summary>The model's name in a report line, with its quantization when it is loaded quantized.</summary>
    static string Name(string dir, Quantization.BnbQuantizeOptions? quantize) =>
        Path.GetFileName(dir.TrimEnd('/')) + (quantize is null ? "" : $" ({quantize.Method}{(quantize.DoubleQuant ? ", double quant" : "")})");

    /// <summary>
    /// A training step replayed from a CUDA graph against the same step run eagerly: at the parameters it was captured
    /// at, after an optimizer step (the replay reads the live parameters, not a snapshot), and on another batch of the
    /// same shape (the replay reads the copied-in inputs). The eager path's run-to-run noise (atomics in attention's
    /// backward) sets the tolerance.
    /// </summary>
    static Result CheckGraph(string dir, Batch batch, bool ckpt, Device dev, bool offload = false, Quantization.BnbQuantizeOptions? quantize = null)
    {
        using var scope = NewDisposeScope();
        using var lm = FastTrainingModel(dir, ScalarType.BFloat16, dev, ckpt, quantize);
        if (offload) OffloadEveryLayer(lm);
        using var opt = new Training.AdamW(lm.Parameters("a"), 0.9, 0.999, 1e-8, 0.0);
        using var other = new Batch
        {
            InputIds = batch.InputIds.roll(7, 1), Labels = batch.Labels.roll(7, 1), AttentionMask = batch.AttentionMask.clone(),
            TargetTokens = batch.TargetTokens, Tokens = batch.Tokens,
        };
        using var stream = CudaStreams.UseSideStream(dev);
        using var step = new GraphedStep(b => Trainer.LossSum(lm.Model, b, chunked: true)) { WarmupRuns = 1 };
        Tensor Grads(Tensor loss) => cat([loss.reshape(1).to(ScalarType.Float32), .. lm.Parameters("a").Select(p => p.param.grad!.flatten().to(ScalarType.Float32))]);
        Tensor Run(Func<Tensor> f) { opt.ZeroGrad(); return Grads(f()).cpu(); }
        // Results are copied to the host: a device tensor made after the capture must not be read after a later replay
        // (CudaGraph), and the replay may reuse its memory.
        var eager = Run(() => step.Run(batch, 1.0));                                   // eager (warm-up)
        double noise = RelL2(Run(() => Eager(lm, batch)), eager);
        double same = RelL2(Run(() => step.Run(batch, 1.0)), eager);                   // capture, then replay
        bool captured = step.Replays == 1;
        opt.Step(1e-2);
        var eagerMoved = Run(() => Eager(lm, batch));
        double change = RelL2(eagerMoved, eager);
        double moved = RelL2(Run(() => step.Run(batch, 1.0)), eagerMoved);
        var eagerOther = Run(() => Eager(lm, other));
        double otherErr = RelL2(Run(() => step.Run(other, 1.0)), eagerOther);
        double tol = Math.Max(4 * noise, 1e-4);
        bool pass = captured && step.Replays == 3 && same <= tol && moved <= tol && otherErr <= tol && change > 10 * tol;
        return new(pass, $"{Name(dir, quantize)} cuda graph{(ckpt ? ", checkpointed" : "")}{(offload ? ", checkpoints offloaded" : "")}: " +
                          (captured ? "" : $"not captured ({step.Disabled}); ") +
                          $"replay vs eager (loss and LoRA grads, rel L2) {same:E2}, after a step {moved:E2}, other batch {otherErr:E2}; " +
                          $"eager noise {noise:E2}, step change {change:E2}");
    }

    /// <summary>
    /// Checkpoints offloaded to host memory and copied back on the copy stream (eagerly, several steps) against the same
    /// steps with checkpoints on the device: the copies are exact, so the two may differ only by the eager path's own
    /// run-to-run noise (atomics in attention's backward).
    /// </summary>
    static Result CheckOffload(string dir, Batch batch, Device dev, Quantization.BnbQuantizeOptions? quantize = null)
    {
        using var scope = NewDisposeScope();
        using var lm = FastTrainingModel(dir, ScalarType.BFloat16, dev, checkpointing: true, quantize);
        Tensor Run() => cat(Enumerable.Range(0, 3).Select(_ =>
        {
            foreach (var (_, p) in lm.Parameters("a")) p.grad?.zero_();
            var loss = Eager(lm, batch);
            return cat([loss.reshape(1).to(ScalarType.Float32), .. lm.Parameters("a").Select(p => p.param.grad!.flatten().to(ScalarType.Float32))]);
        }).ToArray()).cpu();
        var onDevice = Run();
        double noise = RelL2(Run(), onDevice);
        OffloadEveryLayer(lm);
        double err = RelL2(Run(), onDevice);
        long restored = TrainingAccelerator.Offload(lm.Model)!.Restored;
        bool pass = restored == 3 * 4 * lm.Model.model.layers.Count && err <= Math.Max(4 * noise, 1e-6);
        return new(pass, $"{Path.GetFileName(dir.TrimEnd('/'))} checkpoints offloaded to host memory: " +
                          $"{restored} tensors copied back; loss and LoRA grads of 3 steps vs on the device (rel L2) {err:E2}, eager noise {noise:E2}");
    }

    /// <summary>Every layer's checkpoint and kept gate/up go to host memory, released and fetched a layer apart (fixtures have 2 layers).</summary>
    static void OffloadEveryLayer(LoraModel lm)
    {
        TrainingAccelerator.PlaceCheckpoints(lm.Model, "on", checkpointing: true);
        if (TrainingAccelerator.Offload(lm.Model) is { } o) (o.DeviceLayers, o.ReleaseLag, o.PrefetchAhead, o.MlpLayers, o.MlpStride) = (0, 1, 1, int.MaxValue, 1);
    }

    /// <summary>A fixture model with a random-B adapter on all seven linear modules, on the fast training path.</summary>
    static LoraModel FastTrainingModel(string dir, ScalarType dtype, Device dev, bool checkpointing, Quantization.BnbQuantizeOptions? quantize = null)
    {
        var lm = new LoraModel(CausalLM.Load(dir, dtype, dev, quantize));
        lm.AddAdapter("a", new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], InitLoraWeights = "false" }, seed: 1);
        lm.Model.train();
        // The lean replay keeps gate/up for every layer; untied bf16 tables (llama, mistral) go to host memory when checkpointing.
        TrainingAccelerator.Apply(lm, new TrainingAcceleration
        {
            FusedKernels = true, GradientCheckpointing = checkpointing, CheckpointKeepBytes = long.MaxValue, EmbeddingsOnHost = "auto",
        });
        return lm;
    }

    static Tensor Eager(LoraModel lm, Batch b)
    {
        var loss = Trainer.LossSum(lm.Model, b, chunked: true);
        loss.backward();
        return loss.detach();
    }

    static double RelL2(Tensor actual, Tensor expected)
    {
        using var a = actual.to(ScalarType.Float64);
        using var b = expected.to(ScalarType.Float64);
        return (a - b).norm().item<double>() / Math.Max(b.norm().item<double>(), 1e-12);
    }

    static double RelMax(Tensor actual, Tensor expected)
    {
        using var a = actual.to(ScalarType.Float64);
        using var b = expected.to(ScalarType.Float64);
        return (a - b).abs().max().item<double>() / Math.Max(b.abs().max().item<double>(), 1e-12);
    }
}
