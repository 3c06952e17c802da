using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>
/// A decoder-only causal language model (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3) with HF's module tree:
/// <c>model.embed_tokens</c>, <c>model.layers.N.{self_attn,mlp,…}</c>, <c>model.norm</c>, <c>lm_head</c>; the logits
/// soft-capped when the config says so (Gemma 2's final_logit_softcapping).
/// </summary>
public sealed class CausalLM : nn.Module<Tensor, Tensor>
{
    public DecoderModel model;
    public Linear lm_head;

    public ModelConfig Config { get; }
    public ScalarType DType { get; }
    public Device Device { get; }
    /// <summary>The directory the model was loaded from (null when built in memory).</summary>
    public string? NameOrPath { get; private set; }
    /// <summary>The base checkpoint's <see cref="BaseFingerprint"/> (null when built in memory, not from files).</summary>
    public string? Fingerprint { get; private set; }
    /// <summary>
    /// The quantization of the frozen base (its linear layers packed: quantized on load or a pre-quantized checkpoint),
    /// with the compute dtype; null for a full-precision base. Adapters trained on it record it (<see cref="Quantization.BnbQuantizeOptions.AdapterMetadataKey"/>).
    /// </summary>
    public Quantization.BnbQuantizeOptions? Quantization { get; private set; }

    public CausalLM(ModelConfig config, WeightSource w) : base("CausalLM")
    {
        Config = config; DType = w.DType; Device = w.Device;
        model = new DecoderModel("model", w, config);
        lm_head = config.TieWordEmbeddings
            ? new Linear(model.embed_tokens.weight)
            : new Linear("lm_head", w, config.HiddenSize, config.VocabSize, false);
        RegisterComponents();
        w.EnsureAllUsed();
    }

    /// <summary>
    /// Loads config.json and the safetensors weights of an HF checkpoint directory, in evaluation mode (as transformers'
    /// from_pretrained): dropout is off everywhere until a trainer switches to training mode itself.
    /// With <paramref name="quantize"/> the linear layers are quantized as they load and stay packed; a pre-quantized
    /// bitsandbytes checkpoint loads packed without it (<see cref="QuantizedBase"/> decides what a request means), or
    /// dense and dequantized with <paramref name="dequantize"/> (to merge into).
    /// </summary>
    public static CausalLM Load(string dir, ScalarType dtype, Device device, Quantization.BnbQuantizeOptions? quantize = null, bool dequantize = false)
    {
        if (dequantize && quantize is not null) throw new ArgumentException("quantize on load and dequantize on load exclude each other");
        var config = ModelConfig.Load(dir);
        using var files = CheckpointFiles.Open(dir);
        var quantization = QuantizedBase.Resolve(dir, files, quantize, dtype);
        // A tied checkpoint may still carry lm_head.weight (equal to the embeddings); transformers ignores it.
        var ignorable = config.TieWordEmbeddings ? new[] { "lm_head.weight" } : [];
        using var _ = no_grad();
        var model = new CausalLM(config, new CheckpointWeights(files, dtype, device, ignorable) { Quantize = quantization.OnLoad, Dequantize = dequantize });
        model.NameOrPath = dir;
        model.Fingerprint = BaseFingerprint.Compute(config, files);
        model.Quantization = dequantize ? null : quantization.Base;
        model.eval();
        return model;
    }

    /// <summary>
    /// A random-init model of <paramref name="config"/>'s shape (benchmarks of real shapes without a checkpoint), with its
    /// linear layers quantized as they are made when <paramref name="quantize"/> is given (see <see cref="RandomWeights"/>).
    /// </summary>
    public static CausalLM RandomInit(ModelConfig config, ScalarType dtype, Device device, Quantization.BnbQuantizeOptions? quantize = null, long seed = 0)
    {
        var compute = quantize is null ? null : quantize with { ComputeDtype = LoraKit.Quantization.Blockwise4Bit.DtypeName(dtype) };
        compute?.Validate();
        using var _ = no_grad();
        var model = new CausalLM(config, new RandomWeights(dtype, device, seed) { Quantize = compute });
        model.Quantization = compute;
        model.eval();
        return model;
    }

    public override Tensor forward(Tensor ids) => Logits(ids, null, null);

    /// <summary>Logits [B, T, vocab] in the model's dtype.</summary>
    public Tensor Logits(Tensor ids, Tensor? attentionMask, KvCache? cache, Tensor? positions = null, Tensor? segments = null)
    {
        using var scope = NewDisposeScope();
        var h = model.Forward(ids, attentionMask, cache, positions, segments);
        return FamilyOps.SoftCap(lm_head.forward(h), Config.FinalLogitSoftcap).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Logits [N, vocab] at N chosen positions of the batch, given as flat indices into [B·T]: scoring a few positions
    /// of long rows (choices, perplexity) never materialises the whole [B, T, vocab] logits.
    /// </summary>
    /// <paramref name="positions"/> [B, T] gives the tokens' positions when they are not 0..T-1 (the serving engine's packed steps).
    public Tensor LogitsAt(Tensor ids, Tensor flatPositions, Tensor? positions = null)
    {
        using var scope = NewDisposeScope();
        var h = model.Forward(ids, null, null, positions);
        var picked = h.reshape(-1, h.shape[^1]).index_select(0, flatPositions);
        return FamilyOps.SoftCap(lm_head.forward(picked), Config.FinalLogitSoftcap).MoveToOuterDisposeScope();
    }

    /// <summary>Mean next-token negative log-likelihood of a single sequence [1, T] (fp32 logits, like transformers).</summary>
    public Tensor Loss(Tensor ids)
    {
        using var scope = NewDisposeScope();
        return NextTokenLoss(Logits(ids, null, null)[0], ids[0]).MoveToOuterDisposeScope();
    }

    /// <summary>Mean NLL of ids[1..] under logits[..^1] (one sequence: [T, vocab] and [T]), in fp32 as transformers computes it.</summary>
    public static Tensor NextTokenLoss(Tensor logits, Tensor ids)
    {
        using var scope = NewDisposeScope();
        long t = ids.shape[0];
        var pred = logits[TensorIndex.Slice(0, t - 1)].to(ScalarType.Float32);
        return nn.functional.cross_entropy(pred, ids[TensorIndex.Slice(1, t)]).MoveToOuterDisposeScope();
    }
}
