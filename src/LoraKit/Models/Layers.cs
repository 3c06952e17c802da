using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Models;

// Field names in this folder are the checkpoint's keys (snake_case), so module paths equal HF's parameter names.
#pragma warning disable IDE1006

/// <summary>y = x·Wᵀ + b with a frozen weight; the base layer that LoRA wraps.</summary>
public sealed class Linear : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter? bias;

    public Linear(string name, WeightSource w, long inFeatures, long outFeatures, bool hasBias) : base("Linear")
    {
        weight = w.Take(name + ".weight", outFeatures, inFeatures);
        bias = hasBias ? w.Take(name + ".bias", outFeatures) : null;
        RegisterComponents();
    }

    /// <summary>A layer over an existing parameter (tied LM head).</summary>
    public Linear(Parameter sharedWeight) : base("Linear")
    {
        weight = sharedWeight;
        RegisterComponents();
    }

    public long InFeatures => weight.shape[1];
    public long OutFeatures => weight.shape[0];

    public override Tensor forward(Tensor x) => nn.functional.linear(x, weight, bias);
}

/// <summary>RMSNorm as transformers computes it: normalise in fp32, cast back, then scale by the weight.</summary>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    readonly double _eps;

    public RmsNorm(string name, WeightSource w, long dim, double eps) : base("RmsNorm")
    {
        weight = w.Take(name + ".weight", dim);
        _eps = eps;
        RegisterComponents();
    }

    /// <summary>
    /// Training: use <see cref="RmsNormFunction"/> (same numerics, keeps no fp32 copy) while the weight is frozen, and its
    /// fused forward kernel in no-grad passes (a checkpointed layer's first forward), so that pass computes what the
    /// replay recomputes, in one kernel instead of eight.
    /// </summary>
    public bool FusedTraining { get; set; }

    public override Tensor forward(Tensor x)
    {
        if (FusedTraining && training && !weight.requires_grad)
        {
            if (is_grad_enabled()) return RmsNormFunction.Apply(x, weight, _eps);
            if (Runtime.Cuda.FusedKernels.Usable(x, weight))
            {
                var (y, rstd) = Runtime.Cuda.FusedKernels.RmsNormForward(x, weight, _eps);
                rstd.Dispose();
                return y;
            }
        }
        using var scope = NewDisposeScope();
        var dtype = x.dtype;
        var h = x.to(ScalarType.Float32);
        var variance = h.pow(2).mean([-1], keepdim: true);
        h = h * rsqrt(variance + _eps);
        return (weight * h.to(dtype)).MoveToOuterDisposeScope();
    }
}

/// <summary>Token embedding table.</summary>
public sealed class Embedding : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    Runtime.Cuda.HostMappedMemory? _mapped;

    public Embedding(string name, WeightSource w, long vocab, long dim) : base("Embedding")
    {
        weight = w.Take(name + ".weight", vocab, dim);
        RegisterComponents();
    }

    /// <summary>Whether the table lives in host memory and the GPU gathers its rows over PCIe (<see cref="MoveToHost"/>).</summary>
    public bool OnHost => _mapped is not null;

    /// <summary>
    /// Moves a frozen table on the GPU to page-locked host memory mapped for the GPU, freeing its device memory (1 GiB
    /// on Llama-3-8B); each forward then reads only the rows of its tokens over PCIe (32 MiB for 4,096 tokens of a
    /// 4,096-wide model) with one kernel, which CUDA graphs capture like any other. For untied tables: a head that
    /// shares the table needs it on the GPU. Returns why not when it cannot (then nothing changed).
    /// </summary>
    public string? MoveToHost()
    {
        if (OnHost) return null;
        if (weight.device_type != TorchSharp.DeviceType.CUDA || weight.requires_grad) return "the table is not a frozen CUDA tensor";
        if (!Runtime.Cuda.FusedKernels.Usable(weight)) return "the fused CUDA kernels are unavailable or the table is not contiguous bf16";
        var host = weight.cpu(); // a copy: the device table goes when `weight` is disposed below (no other handle may hold it)
        var mapped = Runtime.Cuda.HostMappedMemory.TryMap(host, Runtime.Cuda.FusedKernels.Pointer(host), out var why);
        if (mapped is null) { host.Dispose(); return why; }
        var old = weight;
        weight = new Parameter(host, requires_grad: false);
        ConditionallyRegisterParameter(nameof(weight), weight);
        old.Dispose();
        _mapped = mapped;
        return null;
    }

    public override Tensor forward(Tensor ids)
    {
        if (_mapped is { } m && ids.device_type == TorchSharp.DeviceType.CUDA)
            return Runtime.Cuda.FusedKernels.GatherRows(m.Device, weight.shape[0], weight.shape[1], weight.dtype, ids);
        var shape = ids.shape.Append(weight.shape[1]).ToArray();
        using var flat = ids.reshape(-1);
        using var rows = weight.index_select(0, flat);
        return rows.view(shape);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) _mapped?.Dispose(); // before the tensor's memory goes back to libtorch
        base.Dispose(disposing);
    }
}

/// <summary>SwiGLU feed-forward: down(silu(gate(x)) · up(x)).</summary>
public sealed class Mlp : ContainerModule
{
    public nn.Module<Tensor, Tensor> gate_proj, up_proj, down_proj;

    public Mlp(string name, WeightSource w, ModelConfig c) : base("Mlp")
    {
        gate_proj = new Linear(name + ".gate_proj", w, c.HiddenSize, c.IntermediateSize, c.MlpBias);
        up_proj = new Linear(name + ".up_proj", w, c.HiddenSize, c.IntermediateSize, c.MlpBias);
        down_proj = new Linear(name + ".down_proj", w, c.IntermediateSize, c.HiddenSize, c.MlpBias);
        RegisterComponents();
    }

    /// <summary>Training: finish with <see cref="Lora.SwiGluDown"/>, which keeps only gate and up for backward.</summary>
    public bool FusedTraining { get; set; }

    public override Tensor forward(Tensor x) => Forward(x, null);

    /// <param name="stash">Checkpointing: keeps gate/up when recording, or uses them when replaying (<see cref="LayerStash"/>).</param>
    public Tensor Forward(Tensor x, LayerStash? stash)
    {
        using var scope = NewDisposeScope();
        bool replay = stash is { Replaying: true };
        // Training: gate/up as one group whose backwards sum the input grad in one buffer (see Lora.SharedInputGrad).
        var pair = FusedTraining && training ? Lora.LoraProjection.ApplyShared(x, [gate_proj, up_proj], replay ? [stash!.Gate, stash.Up] : null) : null;
        var gate = pair?[0] ?? (replay && stash!.Gate is { } g ? Lora.LoraProjection.Replay(gate_proj, x, g) : gate_proj.forward(x));
        var up = pair?[1] ?? (replay && stash!.Up is { } u ? Lora.LoraProjection.Replay(up_proj, x, u) : up_proj.forward(x));
        if (stash is { Replaying: false, KeepMlp: true }) stash.KeepMlpOutputs(gate, up);
        if (FusedTraining && training && is_grad_enabled() && Lora.LoraProjection.TryResolve(down_proj, out var down, out var lora))
            return Lora.SwiGluDown.Apply(gate, up, down, lora, outputUnused: replay).MoveToOuterDisposeScope();
        // No-grad passes while training (a checkpointed layer's first forward): the fused product kernel, as the replay uses.
        var h = FusedTraining && training && Runtime.Cuda.FusedKernels.Usable(gate, up) && !(gate.requires_grad || up.requires_grad)
            ? Runtime.Cuda.FusedKernels.SwiGluForward(gate, up)
            : nn.functional.silu(gate) * up;
        return down_proj.forward(h).MoveToOuterDisposeScope();
    }
}
