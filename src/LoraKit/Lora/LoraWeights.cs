using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

// One adapter's tensors on one layer, and the small modules that register them under PEFT's parameter names
// (q_proj.lora_A.<adapter>.weight, q_proj.lora_B.<adapter>.weight, q_proj.lora_magnitude_vector.<adapter>.weight), so
// named_parameters() of a model with adapters reads like PEFT's. The LoRA term s·B·(A·h) is written here, once.

/// <summary>
/// One adapter's weights on one layer: A [r, in], B [out, r] (fp32, trainable), DoRA's magnitude [out] when its variant
/// has one, its scaling, dropout and variant. The tensors live in registered <see cref="LoraFactor"/> modules; the
/// properties read them from there, so a module-wide move or cast is seen here too.
/// </summary>
public sealed class LoraWeights
{
    /// <summary>A plain or DoRA adapter's weights; <paramref name="magnitude"/> is DoRA's (null: initialised from the
    /// base weight when the adapter is added to a layer, as PEFT does).</summary>
    public LoraWeights(Parameter a, Parameter b, double scaling, double dropout, ILoraVariant? variant = null, Parameter? magnitude = null)
    {
        AFactor = new LoraFactor(a);
        BFactor = new LoraFactor(b);
        MagnitudeFactor = magnitude is null ? null : new LoraFactor(magnitude);
        Scaling = scaling;
        Dropout = dropout;
        Variant = variant ?? LoraVariant.Instance;
    }

    internal LoraFactor AFactor { get; }
    internal LoraFactor BFactor { get; }
    internal LoraFactor? MagnitudeFactor { get; set; }

    /// <summary>The down projection, [r, in].</summary>
    public Parameter A => AFactor.weight;
    /// <summary>The up projection, [out, r].</summary>
    public Parameter B => BFactor.weight;
    /// <summary>DoRA's per-output-row magnitude, [out]; null for plain LoRA.</summary>
    public Parameter? Magnitude => MagnitudeFactor?.weight;
    /// <summary>lora_alpha / r (or / √r with rsLoRA).</summary>
    public double Scaling { get; }
    /// <summary>lora_dropout, applied to the adapter's input in training mode.</summary>
    public double Dropout { get; }
    /// <summary>How the adapter enters the layer's output (plain LoRA or DoRA).</summary>
    public ILoraVariant Variant { get; }
    /// <summary>r.</summary>
    public int Rank => (int)A.shape[0];

    /// <summary>What a merge computed that its unmerge needs again (DoRA: the weight norm before the merge).</summary>
    internal Tensor? MergeCache { get; set; }

    /// <summary>s·B·(A·h) in h's dtype (the weights cast to it): the LoRA term, written once.</summary>
    public Tensor Term(Tensor h) =>
        nn.functional.linear(nn.functional.linear(h, A.to(h.dtype)), B.to(h.dtype)).Times(Scaling);

    /// <summary>acc + s·(h·Aᵀ)·Bᵀ on 2-D [tokens, ·] tensors, the addition fused into the second GEMM (addmm).</summary>
    public Tensor AddTerm(Tensor acc, Tensor h) =>
        acc.addmm(nn.functional.linear(h, A.to(h.dtype)), B.to(h.dtype).t(), beta: 1, alpha: (float)Scaling);

    /// <summary>s·B·A in fp32 ([out, in]) without gradients: the delta weight every merge path uses.</summary>
    public Tensor Delta()
    {
        using var _ = no_grad();
        return B.to(ScalarType.Float32).matmul(A.to(ScalarType.Float32)).Times(Scaling);
    }

    /// <summary>The tensors PEFT saves for this adapter, by key suffix (lora_A.weight, lora_B.weight, lora_magnitude_vector).</summary>
    public IEnumerable<(string Suffix, Parameter Tensor)> FileTensors() =>
        Variant.FileSuffixes.Select(s => (s, s switch
        {
            LoraVariant.ASuffix => A,
            LoraVariant.BSuffix => B,
            DoraVariant.MagnitudeSuffix => Magnitude ?? throw new InvalidOperationException("a DoRA adapter without its magnitude"),
            _ => throw new InvalidOperationException($"unknown adapter tensor '{s}'"),
        }));

    internal void Dispose()
    {
        A.Dispose(); B.Dispose(); Magnitude?.Dispose();
        AFactor.Dispose(); BFactor.Dispose(); MagnitudeFactor?.Dispose();
        MergeCache?.Dispose();
    }
}

/// <summary>
/// One registered tensor, PEFT's nn.Linear inside lora_A/lora_B (or DoRA's DoraLinearLayer): a module whose only
/// parameter is named <c>weight</c>, so the parameter's path ends in <c>.lora_A.&lt;adapter&gt;.weight</c>.
/// </summary>
public sealed class LoraFactor : nn.Module
{
#pragma warning disable IDE1006 // PEFT's parameter name
    /// <summary>The tensor itself.</summary>
    public Parameter weight;
#pragma warning restore IDE1006

    /// <summary>Registers <paramref name="p"/> as this module's <c>weight</c>.</summary>
    public LoraFactor(Parameter p) : base("LoraFactor")
    {
        weight = p;
        RegisterComponents();
    }
}

/// <summary>
/// PEFT's ModuleDict keyed by adapter name (lora_A, lora_B, lora_magnitude_vector): adapters come and go after the layer
/// is built, so entries are registered and unregistered one by one (TorchSharp's ModuleDict registers only once).
/// </summary>
public sealed class AdapterSlots : nn.Module
{
    /// <summary>An empty dictionary.</summary>
    public AdapterSlots() : base("ModuleDict") { }

    /// <summary>Registers <paramref name="module"/> under <paramref name="adapter"/>, replacing any earlier one.</summary>
    public void Set(string adapter, nn.Module module)
    {
        Remove(adapter);
        register_module(Key(adapter), module);
    }

    /// <summary>Unregisters <paramref name="adapter"/>'s entry (the caller disposes it).</summary>
    public void Remove(string adapter)
    {
        if (_internal_submodules.ContainsKey(Key(adapter))) _internal_submodules.Remove(Key(adapter)); // its Remove throws on a missing key
    }

    /// <summary>
    /// The entry's module name: the adapter name, with '.' (which a module name cannot hold: it separates path parts)
    /// written %2E, '%' written %25 and the empty name '%', so distinct adapter names never share an entry.
    /// </summary>
    public static string Key(string adapter) => adapter.Length == 0 ? "%" : adapter.Replace("%", "%25", StringComparison.Ordinal).Replace(".", "%2E", StringComparison.Ordinal);
}
