using System.CommandLine;
using System.Diagnostics;
using LoraKit.Accelerated;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Runtime.Cuda;
using LoraKit.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit bench</c>: times LoRA training steps on a fixed batch, the same workload as bench/peft_reference.py
/// (LoRA on all seven linear modules, alpha = 2r, no dropout, AdamW lr 1e-4 with PyTorch's default weight decay 0.01,
/// labels = inputs). Used by bench/run_bench.py, which runs HF + PEFT in the same device call.
/// </summary>
public static class BenchCommand
{
    public static Command Build()
    {
        var model = new Option<string>("--model") { Description = "model directory", Required = true };
        var ids = new Option<string>("--ids") { Description = "safetensors file with an int64 tensor 'input_ids' [batch, seq]", Required = true };
        var steps = new Option<int>("--steps") { Description = "timed steps", DefaultValueFactory = _ => 10 };
        var warmup = new Option<int>("--warmup") { Description = "untimed steps first", DefaultValueFactory = _ => 3 };
        var rank = new Option<int>("--rank") { Description = "LoRA rank", DefaultValueFactory = _ => 16 };
        var ckpt = new Option<bool>("--gradient-checkpointing") { Description = "recompute layer activations in backward" };
        var keep = new Option<double>("--checkpoint-keep-gib") { Description = "as for train", DefaultValueFactory = _ => TrainConfig.DefaultCheckpointKeepGib };
        var plain = new Option<bool>("--plain-loss") { Description = "materialise full logits (the unoptimised path)" };
        var device = new Option<string>("--device") { Description = "auto, cpu or cuda", DefaultValueFactory = _ => "auto" };
        var embeddings = new Option<string>("--embeddings-on-host") { Description = "auto, on or off (as for train)", DefaultValueFactory = _ => "auto" };
        var offload = new Option<string>("--offload-checkpoints") { Description = "auto, on or off (as for train)", DefaultValueFactory = _ => "auto" };
        var offloadMlp = new Option<int>("--offload-mlp-layers") { Description = "with --offload-checkpoints: the first layers whose kept gate/up go to host memory too" };
        var kernels = new Option<string>("--kernels") { Description = "fast, exact or auto (as for train)", DefaultValueFactory = _ => "auto" };
        var profile = new Option<bool>("--profile") { Description = "also time forward, backward and the optimizer separately (synchronising between them)" };
        var graph = new Option<string>("--cuda-graph") { Description = "auto, on or off (as for train)", DefaultValueFactory = _ => "auto" };
        var memoryTrace = new Option<bool>("--memory-trace") { Description = "finally run one eager step noting the allocated bytes and the peak between its phases (where the peak falls)" };
        var lossChunk = new Option<int?>("--loss-chunk-mib") { Description = "the chunked loss's logits budget per chunk (default 256)" };
        var profileRange = new Option<bool>("--profile-range") { Description = "finally run one step between cudaProfilerStart and cudaProfilerStop (for ncu/nsys)" };
        var quantize = new QuantizeOptions();
        var randomInit = new Option<bool>("--random-init") { Description = "random weights of --model's config.json shape, made on the device (with --quantize: quantized as made, never whole in 16 bits)" };
        var cmd = new Command("bench", "Time LoRA training steps on a fixed batch (for bench/run_bench.py).") { model, ids, steps, warmup, rank, ckpt, keep, embeddings, plain, device, kernels, graph, profile, profileRange, memoryTrace, lossChunk, offload, offloadMlp, randomInit };
        quantize.AddTo(cmd);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var (dev, dtype) = Placement.Resolve(r.GetValue(device)!);
            if (r.GetValue(lossChunk) is int mib) ChunkedLmLoss.ChunkBytes = (long)mib << 20;
            var modelDir = ModelArgument.Resolve(r.GetValue(model)!);
            var q = quantize.Resolve(r);
            var load = Stopwatch.StartNew();
            using var lm = new LoraModel(r.GetValue(randomInit)
                ? CausalLM.RandomInit(ModelConfig.Load(modelDir), dtype, dev, q)
                : CausalLM.Load(modelDir, dtype, dev, q));
            double loadSeconds = load.Elapsed.TotalSeconds;
            var afterLoad = CudaMemoryStats.Read(dev);
            int rk = r.GetValue(rank);
            lm.AddAdapter("bench", new LoraConfig { R = rk, LoraAlpha = 2 * rk, LoraDropout = 0, TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] });
            bool fast = Trainer.FastKernels(r.GetValue(kernels)!, dev, dtype);
            var acceleration = new TrainingAcceleration
            {
                FusedKernels = fast, GradientCheckpointing = r.GetValue(ckpt), CheckpointKeepBytes = (long)(r.GetValue(keep) * (1L << 30)),
                EmbeddingsOnHost = r.GetValue(embeddings)!, OffloadCheckpoints = r.GetValue(offload)!, OffloadMlpLayers = r.GetValue(offloadMlp),
            };
            foreach (var line in TrainingAccelerator.Apply(lm, acceleration)) Console.Error.WriteLine(FlagNames.Rephrase(line));
            lm.Model.train();
            using var f = SafetensorsFile.Open(r.GetValue(ids)!);
            using var input = f.Read("input_ids").to(dev);
            using var batch = new Batch
            {
                InputIds = input.alias(), Labels = input.alias(), AttentionMask = ones_like(input),
                TargetTokens = input.shape[0] * (input.shape[1] - 1), Tokens = input.numel(),
            };
            using var opt = new AdamW(lm.Parameters("bench"), 0.9, 0.999, 1e-8, 0.01);
            bool chunked = !r.GetValue(plain);
            int timed = r.GetValue(steps);
            bool graphed = Trainer.UseCudaGraph(r.GetValue(graph)!, dev, fast, dropout: 0);
            using var stream = graphed ? CudaStreams.UseSideStream(dev) : null;
            using var step = new GraphedStep(b => Trainer.LossSum(lm.Model, b, chunked), graphed);
            // Losses land in a buffer made before the capture: a tensor allocated after it must not outlive a replay.
            using var history = zeros(timed + 1, ScalarType.Float32, dev);
            // One step without synchronising: the next step's work queues behind this one, as in HF's loop.
            void Step(int slot)
            {
                using var scope = NewDisposeScope();
                var loss = step.Run(batch, 1.0 / batch.TargetTokens);
                history[slot].copy_(loss);
                opt.Step(1e-4);
                opt.ZeroGrad();
            }
            // The peak counts from the first step on, not from after the warm-up as run_bench.py does for HF: replays of a
            // CUDA graph reuse blocks the allocator counts as free, so only the eager and captured steps show the step's
            // activations in the allocated bytes.
            Sync(dev);
            CudaMemoryStats.ResetPeak(dev);
            Step(0);
            double first = history[0].item<float>() / batch.TargetTokens;
            for (int i = 1; i < r.GetValue(warmup); i++) Step(0);
            Sync(dev);
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < timed; i++) Step(i + 1);
            Sync(dev);
            double stepSeconds = clock.Elapsed.TotalSeconds / timed;
            double last = history[timed].item<float>() / batch.TargetTokens;
            var memory = CudaMemoryStats.Read(dev);
            object? phases = r.GetValue(profile) ? Profile(lm, batch, opt, chunked, dev) : null;
            object? trace = r.GetValue(memoryTrace) ? TraceMemory(lm, batch, opt, chunked, dev) : null;
            if (r.GetValue(profileRange))
            {
                // One step inside cudaProfilerStart/Stop, for `ncu/nsys --profile-from-start off` (bench/profile.sh).
                if (!CudaProfiler.Available) Console.Error.WriteLine("warning: no CUDA runtime loaded; --profile-range marks nothing");
                Sync(dev);
                CudaProfiler.Start();
                Step(0);
                Sync(dev);
                CudaProfiler.Stop();
            }
            Console.WriteLine(CliJson.Serialize(new
            {
                system = "lorakit", step_s = Math.Round(stepSeconds, 4), tokens_per_s = Math.Round(batch.Tokens / stepSeconds),
                loss_step1 = Math.Round(first, 4), loss = Math.Round(last, 4), chunked_loss = chunked, gradient_checkpointing = r.GetValue(ckpt), checkpoint_keep_gib = r.GetValue(keep),
                peak_alloc_gib = memory is { } m ? Math.Round(CudaMemory.Gib(m.PeakAllocated), 2) : (double?)null,
                peak_reserved_gib = memory is { } n ? Math.Round(CudaMemory.Gib(n.PeakReserved), 2) : (double?)null,
                embeddings_on_host = TrainingAccelerator.EmbeddingsOnHost(lm.Model), offload_checkpoints = TrainingAccelerator.Offload(lm.Model) is not null,
                kernels = fast ? "fast" : "exact", cuda_graph = graphed ? (step.Disabled ?? $"{step.Replays} replays") : "off", phases_ms = phases,
                memory_trace = trace, quantize = q?.Method, load_s = Math.Round(loadSeconds, 1),
                model_gib = afterLoad is { } a ? Math.Round(CudaMemory.Gib(a.Allocated), 2) : (double?)null,
            }));
            return 0;
        }));
        return cmd;
    }

    static void Sync(Device dev)
    {
        if (dev.type == TorchSharp.DeviceType.CUDA) cuda.synchronize(dev);
    }

    /// <summary>One eager step with <see cref="MemoryTrace"/> marks between its phases: where the step's peak falls.</summary>
    static object TraceMemory(LoraModel lm, Batch batch, AdamW opt, bool chunked, Device dev)
    {
        MemoryTrace.Enabled = true;
        MemoryTrace.Mark("before the step", dev);
        using (NewDisposeScope())
        {
            using var tokens = batch.TargetTokens.ToScalar(); // held across the division (TorchSharp would let a temporary be finalized mid-call)
            var loss = Trainer.LossSum(lm.Model, batch, chunked).div(tokens);
            loss.backward();
            MemoryTrace.Mark("backward done", dev);
            opt.Step(1e-4);
            opt.ZeroGrad();
            MemoryTrace.Mark("optimizer", dev);
        }
        MemoryTrace.Mark("after the step", dev);
        MemoryTrace.Enabled = false;
        return MemoryTrace.Take().Select(e => new { phase = e.Label, allocated_gib = e.AllocatedGib, peak_since_previous_gib = e.PeakGib }).ToList();
    }

    /// <summary>
    /// Where a step's time goes: each phase timed to a synchronisation, and how long the host took to queue the forward
    /// pass (when that is close to the forward's time, the GPU waits on the host).
    /// </summary>
    static object Profile(LoraModel lm, Batch batch, AdamW opt, bool chunked, Device dev, int steps = 5)
    {
        double fwdQueue = 0, fwd = 0, bwd = 0, optim = 0;
        for (int i = 0; i < steps; i++)
        {
            using var scope = NewDisposeScope();
            Sync(dev);
            var t = Stopwatch.StartNew();
            using var tokens = batch.TargetTokens.ToScalar(); // held across the division (TorchSharp would let a temporary be finalized mid-call)
            var loss = Trainer.LossSum(lm.Model, batch, chunked).div(tokens);
            fwdQueue += t.Elapsed.TotalMilliseconds;
            Sync(dev);
            fwd += t.Elapsed.TotalMilliseconds;
            t.Restart();
            loss.backward();
            Sync(dev);
            bwd += t.Elapsed.TotalMilliseconds;
            t.Restart();
            opt.Step(1e-4);
            opt.ZeroGrad();
            Sync(dev);
            optim += t.Elapsed.TotalMilliseconds;
        }
        return new
        {
            forward_and_loss = Math.Round(fwd / steps, 1), forward_host_queue = Math.Round(fwdQueue / steps, 1),
            backward = Math.Round(bwd / steps, 1), optimizer = Math.Round(optim / steps, 1),
        };
    }
}
