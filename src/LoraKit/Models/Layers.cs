using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Models;

// Field names in this folder are the checkpoint's keys (snake_case), so module paths equal HF's parameter names.
#pragma warning disable IDE1006

/// <summary>
/// y = x·Wᵀ + b with a frozen weight; the base layer that adapters wrap. W is dense (the parameter <c>weight</c>) or,
/// on a quantized base, packed (<see cref="Packed"/>, the submodule <c>weight</c> whose buffers are bnb's storage)
/// and dequantized per forward. Code that needs W itself either calls <see cref="EffectiveWeight"/> (works for both)
/// or reads <see cref="weight"/>, which exists only for a dense layer and says so clearly otherwise.
/// </summary>
public sealed class Linear : nn.Module<Tensor, Tensor>
{
    public Parameter? bias;

    /// <summary>The packed weight of a quantized layer (null: dense).</summary>
    public Quantization.PackedWeight? Packed { get; private set; }

    public Linear(string name, WeightSource w, long inFeatures, long outFeatures, bool hasBias) : base("Linear")
    {
        Packed = w.TakePacked(name + ".weight", outFeatures, inFeatures);
        var dense = Packed is null ? w.Take(name + ".weight", outFeatures, inFeatures) : null;
        bias = hasBias ? w.Take(name + ".bias", outFeatures) : null;
        Register(dense);
    }

    /// <summary>A layer over an existing parameter (tied LM head).</summary>
    public Linear(Parameter sharedWeight) : base("Linear")
    {
        Register(sharedWeight);
    }

    // Registered by hand: the dense parameter and the packed module share the checkpoint's name "weight". The dense one
    // is read back from the registry (not a field), so a module-wide move (to(device/dtype)) that re-registers it is seen.
    void Register(Parameter? dense)
    {
        if (dense is not null) register_parameter("weight", dense);
        if (Packed is not null) register_module("weight", Packed);
        if (bias is not null) register_parameter("bias", bias);
    }

    /// <summary>
    /// Puts <paramref name="replacement"/> in place of the packed weight: a subclass over the same buffers that computes
    /// faster (a CUDA kernel's, swapped in from outside as the other fast modules are). It keeps the place and name
    /// "weight", so state dicts and checkpoints do not change.
    /// </summary>
    public void ReplacePacked(Quantization.PackedWeight replacement)
    {
        if (Packed is null) throw new InvalidOperationException("this linear layer is dense; there is no packed weight to replace");
        if (!replacement.Shape.SequenceEqual(Packed.Shape) || replacement.Method != Packed.Method)
            throw new ArgumentException($"a replacement packed weight must have the same method and shape ({Packed.Method} [{string.Join(", ", Packed.Shape)}])");
        Packed = replacement;
        _internal_submodules["weight"] = replacement; // the ordered dictionary's indexer replaces in place
    }

    /// <summary>The dense weight [out, in]; a quantized layer has none (use <see cref="EffectiveWeight"/>, or decline).</summary>
    public Parameter weight => Dense ?? throw new InvalidOperationException(
        $"this linear layer's weight is {Packed!.Method}-quantized (packed); a dense-weight path does not apply to a quantized base, use EffectiveWeight");

    /// <summary>Whether the weight is packed (a quantized base layer).</summary>
    public bool IsQuantized => Packed is not null;

    Parameter? Dense => Packed is null ? get_parameter("weight") : null;

    /// <summary>The weight the layer computes with, in <paramref name="dtype"/>: the dense one cast, or the packed one dequantized (a new tensor).</summary>
    public Tensor EffectiveWeight(ScalarType dtype) => Packed is { } p ? p.Dequantize(dtype) : Dense!.to(dtype);

    public long InFeatures => Packed?.Shape[1] ?? Dense!.shape[1];
    public long OutFeatures => Packed?.Shape[0] ?? Dense!.shape[0];

    public override Tensor forward(Tensor x) => Packed is { } p ? p.Linear(x, bias) : nn.functional.linear(x, Dense!, bias);
}

/// <summary>
/// RMSNorm as transformers computes it (see <see cref="FamilyOps.RmsNorm"/>): Llama's normalises in fp32, casts back and
/// scales by w; Gemma's scales by (1 + w) in fp32 and then casts (<see cref="NormKind"/>).
/// </summary>
public class RmsNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;

    /// <summary>The epsilon added to the mean square.</summary>
    public double Eps { get; }

    /// <summary>How the weight applies: w (Llama) or 1 + w (Gemma).</summary>
    public NormKind Kind { get; }

    public RmsNorm(string name, WeightSource w, long dim, double eps, NormKind kind = NormKind.Weight) : base("RmsNorm")
    {
        weight = w.Take(name + ".weight", dim);
        Eps = eps;
        Kind = kind;
        RegisterComponents();
    }

    /// <summary>A module over <paramref name="other"/>'s weight (shared, not copied), for a subclass swapped in after build.</summary>
    public RmsNorm(RmsNorm other) : base("RmsNorm")
    {
        weight = other.weight;
        Eps = other.Eps;
        Kind = other.Kind;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => FamilyOps.RmsNorm(x, weight, Eps, Kind);
}

/// <summary>Token embedding table.</summary>
public class Embedding : nn.Module<Tensor, Tensor>
{
    public Parameter weight;

    public Embedding(string name, WeightSource w, long vocab, long dim) : base("Embedding")
    {
        weight = w.Take(name + ".weight", vocab, dim);
        RegisterComponents();
    }

    /// <summary>A module over <paramref name="other"/>'s table (shared, not copied), for a subclass swapped in after build.</summary>
    public Embedding(Embedding other) : base("Embedding")
    {
        weight = other.weight;
        RegisterComponents();
    }

    public override Tensor forward(Tensor ids)
    {
        var shape = ids.shape.Append(weight.shape[1]).ToArray();
        using var flat = ids.reshape(-1);
        using var rows = weight.index_select(0, flat);
        return rows.view(shape);
    }
}

/// <summary>
/// Gated feed-forward: down(act(gate(x)) · up(x)), act silu (SwiGLU) or tanh-GELU (Gemma's GeGLU); gate and up come
/// from two projections, or from one fused gate_up_proj (Phi-3, <see cref="ModelConfig.FusedGateUp"/>) whose output is
/// split in half, gate first.
/// </summary>
public class Mlp : ContainerModule
{
    /// <summary>The separate projections; null when <see cref="gate_up_proj"/> holds both.</summary>
    public nn.Module<Tensor, Tensor>? gate_proj, up_proj;
    /// <summary>Phi-3: one projection whose output rows are gate, then up (null for the other families).</summary>
    public nn.Module<Tensor, Tensor>? gate_up_proj;
    public nn.Module<Tensor, Tensor> down_proj;

    /// <summary>The gate's activation (<see cref="ModelConfig.HiddenAct"/>).</summary>
    public Activation Act { get; }

    public Mlp(string name, WeightSource w, ModelConfig c) : base("Mlp")
    {
        Act = c.HiddenAct;
        if (c.FusedGateUp) gate_up_proj = new Linear(name + ".gate_up_proj", w, c.HiddenSize, 2L * c.IntermediateSize, c.MlpBias);
        else
        {
            gate_proj = new Linear(name + ".gate_proj", w, c.HiddenSize, c.IntermediateSize, c.MlpBias);
            up_proj = new Linear(name + ".up_proj", w, c.HiddenSize, c.IntermediateSize, c.MlpBias);
        }
        down_proj = new Linear(name + ".down_proj", w, c.IntermediateSize, c.HiddenSize, c.MlpBias);
        RegisterComponents();
    }

    /// <summary>A module over <paramref name="other"/>'s projections (shared, not copied), for a subclass swapped in after build.</summary>
    public Mlp(Mlp other) : base("Mlp")
    {
        (gate_proj, up_proj, gate_up_proj, down_proj) = (other.gate_proj, other.up_proj, other.gate_up_proj, other.down_proj);
        Act = other.Act;
        RegisterChildrenOf(other);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var (gate, up) = gate_up_proj is null ? (gate_proj!.forward(x), up_proj!.forward(x)) : FamilyOps.SplitGateUp(gate_up_proj.forward(x));
        return down_proj.forward(FamilyOps.Activate(gate, Act) * up).MoveToOuterDisposeScope();
    }
}
