using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// DoRA (weight-decomposed LoRA, <c>use_dora: true</c>), as PEFT's DoraLinearVariant and DoraLinearLayer compute it:
/// W' = m · (W + s·B·A) / ‖W + s·B·A‖, the norm taken per output row (dim 1 of the [out, in] weight) and detached
/// from the graph (DoRA paper §4.3: it is treated as a constant, so only m, A and B get gradients through the scale).
/// Forward adds (m/‖·‖ − 1)·(base result without bias) + (m/‖·‖)·s·B·A·x to the running result; with dropout active the
/// base result is recomputed on the dropped-out input instead (PEFT's order). The magnitude starts as the norm itself,
/// so a fresh adapter with B = 0 changes nothing. Files hold it as <c>…lora_magnitude_vector</c> (no ".weight"); in
/// the model it is the parameter <c>…lora_magnitude_vector.&lt;adapter&gt;.weight</c>, as in PEFT.
/// </summary>
public sealed class DoraVariant : ILoraVariant
{
    /// <summary>The one instance (the variant has no state; the magnitude lives in <see cref="LoraWeights"/>).</summary>
    public static readonly DoraVariant Instance = new();
    /// <summary>PEFT's file key suffix of the magnitude (get_peft_model_state_dict drops the ".weight").</summary>
    public const string MagnitudeSuffix = "lora_magnitude_vector";

    DoraVariant() { }

    /// <inheritdoc/>
    public string Name => "DoRA";
    /// <inheritdoc/>
    public bool IsPlainTerm => false;
    /// <inheritdoc/>
    public IReadOnlyList<string> FileSuffixes { get; } = [LoraVariant.ASuffix, LoraVariant.BSuffix, MagnitudeSuffix];

    /// <summary>‖W + s·L‖ per output row, in the sum's dtype (PEFT's get_weight_norm).</summary>
    static Tensor WeightNorm(Tensor weight, Tensor loraWeight, double scaling) =>
        weight.Plus(loraWeight.Times(scaling)).norm(1); // = linalg.vector_norm(·, 2, [1]), which frees its own ord Scalar too early

    /// <summary>PEFT's update_layer: m = ‖W + s·B·A‖ with the adapter's initial A and B (fp32, trainable).</summary>
    public void Init(Models.Linear baseLayer, LoraWeights w)
    {
        if (w.Magnitude is not null) return; // loaded from a file
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var norm = WeightNorm(baseLayer.EffectiveWeight(ScalarType.Float32), w.B.matmul(w.A), w.Scaling);
        w.MagnitudeFactor = new LoraFactor(new Parameter(norm.DetachFromDisposeScope(), true));
    }

    /// <inheritdoc/>
    public Tensor Forward(Models.Linear baseLayer, LoraWeights w, Tensor x, Tensor result, Func<Tensor, Tensor>? dropout)
    {
        var magnitude = w.Magnitude ?? throw new InvalidOperationException("a DoRA adapter without its magnitude");
        if (dropout is not null) x = dropout(x);
        var weight = baseLayer.EffectiveWeight(x.dtype);
        Tensor loraWeight;
        using (no_grad()) loraWeight = w.B.to(x.dtype).matmul(w.A.to(x.dtype));  // PEFT passes lora_weight.detach()
        var norm = WeightNorm(weight, loraWeight, w.Scaling).detach();
        var scale = (magnitude / norm).view(1, -1);
        var lora = nn.functional.linear(nn.functional.linear(x, w.A.to(x.dtype)), w.B.to(x.dtype));
        // Without dropout the base result is the running result less the bias; with it, the dropped-out input's.
        var baseResult = dropout is not null ? nn.functional.linear(x, weight)
            : baseLayer.bias is { } bias ? result - bias : result;
        return result.Plus(scale.Minus(1).mul(baseResult).Plus(scale.mul(lora).Times(w.Scaling)));
    }

    /// <summary>PEFT's merge_safe: W' = (m / ‖W + ΔW‖) · (W + ΔW), the norm kept for the unmerge.</summary>
    public Tensor Merged(LoraWeights w, Tensor weight, Tensor delta, out Tensor? cache)
    {
        var norm = WeightNorm(weight, delta, 1.0);
        cache = norm;
        return (w.Magnitude! / norm).view(-1, 1) * weight.Plus(delta);
    }

    /// <summary>PEFT's unmerge: W = W' / (m / ‖W + ΔW‖) − ΔW, with the norm the merge used.</summary>
    public Tensor Unmerged(LoraWeights w, Tensor weight, Tensor delta, Tensor? cache) =>
        weight / (w.Magnitude! / cache!).view(-1, 1) - delta;
}
