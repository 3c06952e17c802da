using static TorchSharp.torch;

namespace LoraKit.Lora;

// The adapter-variant interface (PEFT's LoraVariant): what differs between plain LoRA and a variant such as DoRA is
// how it is initialised, how it enters the layer's output, how it is merged into and taken out of the base weight,
// and which tensors its files hold. Everything else (the layer, targeting, files, training) is shared.

/// <summary>How an adapter enters a <see cref="LoraLinear"/>: one class per variant (<see cref="LoraVariant"/>, <see cref="DoraVariant"/>).</summary>
public interface ILoraVariant
{
    /// <summary>Short name for messages ("LoRA", "DoRA").</summary>
    string Name { get; }

    /// <summary>
    /// Whether the output is base + s·B·A·x and nothing else, so the fused training kernels (which hand-write exactly
    /// that and its backward) and the stacked per-row serving GEMMs may compute it.
    /// </summary>
    bool IsPlainTerm { get; }

    /// <summary>The key suffixes of this variant's tensors in PEFT's adapter_model.safetensors, in file order.</summary>
    IReadOnlyList<string> FileSuffixes { get; }

    /// <summary>Sets what the variant derives from the base layer when an adapter is created (DoRA: the magnitude).</summary>
    void Init(Models.Linear baseLayer, LoraWeights w);

    /// <summary>
    /// <paramref name="result"/> plus this adapter's contribution. <paramref name="x"/> is already in the adapter's dtype
    /// (fp32), <paramref name="dropout"/> is the layer's dropout for this adapter (null when inactive: eval mode or p = 0).
    /// </summary>
    Tensor Forward(Models.Linear baseLayer, LoraWeights w, Tensor x, Tensor result, Func<Tensor, Tensor>? dropout);

    /// <summary>The fp32 base weight with the adapter merged in; <paramref name="cache"/> is what <see cref="Unmerged"/> needs.</summary>
    Tensor Merged(LoraWeights w, Tensor weight, Tensor delta, out Tensor? cache);

    /// <summary>The fp32 base weight with the adapter taken out again (the inverse of <see cref="Merged"/>).</summary>
    Tensor Unmerged(LoraWeights w, Tensor weight, Tensor delta, Tensor? cache);
}

/// <summary>Plain LoRA: y = base(x) + s·B·A·dropout(x); merging adds s·B·A to the weight.</summary>
public sealed class LoraVariant : ILoraVariant
{
    /// <summary>The one instance (the variant has no state).</summary>
    public static readonly LoraVariant Instance = new();
    /// <summary>PEFT's key suffix of A (without the adapter name, as saved).</summary>
    public const string ASuffix = "lora_A.weight";
    /// <summary>PEFT's key suffix of B.</summary>
    public const string BSuffix = "lora_B.weight";

    LoraVariant() { }

    /// <inheritdoc/>
    public string Name => "LoRA";
    /// <inheritdoc/>
    public bool IsPlainTerm => true;
    /// <inheritdoc/>
    public IReadOnlyList<string> FileSuffixes { get; } = [ASuffix, BSuffix];
    /// <inheritdoc/>
    public void Init(Models.Linear baseLayer, LoraWeights w) { }
    /// <inheritdoc/>
    public Tensor Forward(Models.Linear baseLayer, LoraWeights w, Tensor x, Tensor result, Func<Tensor, Tensor>? dropout) =>
        result.Plus(w.Term(dropout is null ? x : dropout(x)));

    /// <inheritdoc/>
    public Tensor Merged(LoraWeights w, Tensor weight, Tensor delta, out Tensor? cache)
    {
        cache = null;
        return weight.Plus(delta);
    }

    /// <inheritdoc/>
    public Tensor Unmerged(LoraWeights w, Tensor weight, Tensor delta, Tensor? cache) => weight - delta;
}
