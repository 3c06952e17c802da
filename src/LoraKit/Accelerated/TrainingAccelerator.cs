using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Runtime;

namespace LoraKit.Accelerated;

/// <summary>What <see cref="TrainingAccelerator.Apply(LoraModel, TrainingAcceleration)"/> swaps into a model.</summary>
public sealed record TrainingAcceleration
{
    /// <summary>
    /// The fused training kernels: LoRA branches in the activations' dtype, RMSNorm and the SwiGLU tail with hand-written
    /// backwards, shared-input-grad q/k/v and gate/up, fused RoPE on CUDA bf16, and with checkpointing the lean replay.
    /// </summary>
    public bool FusedKernels { get; init; }
    /// <summary>Recompute each layer's activations in backward instead of keeping them (see <see cref="CheckpointRunner"/>).</summary>
    public bool GradientCheckpointing { get; init; }
    /// <summary>Checkpointing: device memory the layers may spend keeping gate/up (<see cref="CheckpointRunner.KeepBytes"/>).</summary>
    public long CheckpointKeepBytes { get; init; }
    /// <summary>auto, on or off: an untied frozen input embedding in mapped host memory (<see cref="HostEmbedding"/>); auto with checkpointing on CUDA.</summary>
    public string EmbeddingsOnHost { get; init; } = "off";
    /// <summary>auto, on or off: layer checkpoints wait for backward in host memory (<see cref="CheckpointOffload"/>); auto with checkpointing on CUDA.</summary>
    public string OffloadCheckpoints { get; init; } = "off";
    /// <summary>With offloaded checkpoints: how many layers' kept gate/up go to host memory too (<see cref="CheckpointOffload.MlpLayers"/>).</summary>
    public int OffloadMlpLayers { get; init; }
    /// <summary>The stream dropout draws from, replayed by checkpointed layers (null: torch's global generator).</summary>
    public RngStream? Rng { get; init; }
}

/// <summary>
/// The one place the training fast paths enter a built model (llm.c's train_gpt2.cu beside its train_gpt2.c): it swaps
/// the reference modules of <see cref="LoraKit.Models"/> for subclasses over the same parameters
/// (<see cref="FastAttention"/>, <see cref="FastMlp"/>, <see cref="FusedRmsNorm"/>, <see cref="HostEmbedding"/>) and
/// plugs <see cref="CheckpointRunner"/> into the model's layer loop. The reference modules stay the oracle the tests
/// compare these with. Applying again re-decides everything from the new options (a table moved to host memory stays
/// there).
/// <para>
/// The fast modules implement the Llama-family block (SwiGLU MLP, plain RMSNorm, pre-norm residuals: see
/// <see cref="LeanLayer"/>, <see cref="FastMlp"/>, <see cref="FusedRmsNorm"/>). A family whose modules compute something
/// else is declined here (<see cref="Declines"/>: Phi-3's fused projections, Gemma 2/3's block), with a line in the log:
/// its reference modules run as they are, with checkpointing if asked (plain recompute, no offload), until its fast path
/// exists.
/// </para>
/// </summary>
public static class TrainingAccelerator
{
    /// <summary>
    /// Swaps the fast paths <paramref name="o"/> asks for into <paramref name="lm"/>'s model (after its adapters are in
    /// place: the swapped modules share the wrapped projections) and sets its LoRA layers' compute dtype. Returns lines
    /// for the log (what was placed where, or why not).
    /// </summary>
    public static List<string> Apply(LoraModel lm, TrainingAcceleration o)
    {
        lm.UseFastTraining(o.FusedKernels);
        return Apply(lm.Model, o);
    }

    /// <inheritdoc cref="Apply(LoraModel, TrainingAcceleration)"/>
    public static List<string> Apply(CausalLM model, TrainingAcceleration o)
    {
        var trunk = model.model;
        var log = new List<string>();
        if (KernelPackedWeights.Apply(model) is { } packed) log.Add(packed);
        if (Declines(model) is { } why)
        {
            // The reference modules stay; checkpointing (plain replay) and the memory placements work on any block.
            if (o.FusedKernels || model.Device.type == TorchSharp.DeviceType.CUDA)
                log.Add($"fast layer modules: declined for {model.Config.Architecture} ({why}); its layers run the reference modules");
        }
        else
        {
            foreach (var layer in trunk.layers) SwapLayer(layer, o.FusedKernels);
            trunk.ReplaceChild(nameof(trunk.norm), Norm(trunk.norm, o.FusedKernels), keepPlace: true);
        }
        trunk.Runner = o.GradientCheckpointing
            ? new CheckpointRunner { KeepBytes = o.CheckpointKeepBytes, Rng = o.Rng }
            : PlainLayerRunner.Instance;
        if (PlaceEmbeddings(model, o.EmbeddingsOnHost, o.GradientCheckpointing) is { } placed) log.Add(placed);
        if (PlaceCheckpoints(model, o.OffloadCheckpoints, o.GradientCheckpointing, o.OffloadMlpLayers) is { } offloaded) log.Add(offloaded);
        return log;
    }

    /// <summary>
    /// Why the fast layer modules do not apply to a family (null: they do): what in <paramref name="c"/>'s block they do
    /// not compute. They implement the Llama-family block (separate q/k/v and gate/up projections, plain RMSNorm, SwiGLU,
    /// pre-norm residuals, SDPA attention); Phi-3's fused projections and Gemma 2/3's block are declined until a fast
    /// path for them exists.
    /// </summary>
    public static string? Declines(ModelConfig c)
    {
        var differences = new List<string>();
        if (c.FusedQkv || c.FusedGateUp) differences.Add("fused qkv_proj / gate_up_proj projections have no fast path yet");
        if (c.Norm != NormKind.Weight) differences.Add("(1 + w) RMSNorm");
        if (c.HiddenAct != Activation.Silu) differences.Add("a GeGLU MLP");
        if (c.PostNorms) differences.Add("post-attention/feed-forward norms");
        if (c.AttnLogitSoftcap is not null) differences.Add("soft-capped attention scores");
        if (c.AttentionScale != 1.0 / Math.Sqrt(c.HeadDim)) differences.Add("attention scaled by query_pre_attn_scalar");
        return differences.Count == 0 ? null : string.Join(", ", differences);
    }

    /// <summary>
    /// Why the fast layer modules do not apply to <paramref name="model"/> (null: they do): its family's block
    /// (<see cref="Declines(ModelConfig)"/>). A quantized base takes them too: their projections dequantize each packed
    /// weight per GEMM (<see cref="KernelPackedWeights"/> on CUDA).
    /// </summary>
    public static string? Declines(CausalLM model) => Declines(model.Config);

    /// <summary>Whether any of the model's linear layers is packed (a quantized base).</summary>
    public static bool Quantized(CausalLM model) => model.Quantization is not null || model.modules().OfType<Linear>().Any(l => l.IsQuantized);

    /// <summary>Whether the model's input embedding lives in host memory (<see cref="HostEmbedding"/>).</summary>
    public static bool EmbeddingsOnHost(CausalLM model) => model.model.embed_tokens is HostEmbedding;

    /// <summary>The model's checkpoint offload, if its layers are checkpointed with one.</summary>
    public static CheckpointOffload? Offload(CausalLM model) => (model.model.Runner as CheckpointRunner)?.Offload;

    static void SwapLayer(DecoderLayer layer, bool fused)
    {
        var attn = new FastAttention(layer.self_attn, fused);
        if (attn.q_norm is { } qn) attn.ReplaceChild(nameof(attn.q_norm), Norm(qn, fused), keepPlace: true);
        if (attn.k_norm is { } kn) attn.ReplaceChild(nameof(attn.k_norm), Norm(kn, fused), keepPlace: true);
        layer.ReplaceChild(nameof(layer.self_attn), attn, keepPlace: true);
        layer.ReplaceChild(nameof(layer.mlp), fused ? new FastMlp(layer.mlp) : Reference(layer.mlp), keepPlace: true);
        layer.ReplaceChild(nameof(layer.input_layernorm), Norm(layer.input_layernorm, fused), keepPlace: true);
        layer.ReplaceChild(nameof(layer.post_attention_layernorm), Norm(layer.post_attention_layernorm, fused), keepPlace: true);
    }

    static RmsNorm Norm(RmsNorm norm, bool fused)
    {
        RmsNorm swapped = fused ? new FusedRmsNorm(norm) : norm is FusedRmsNorm ? new RmsNorm(norm) : norm;
        if (swapped != norm) swapped.train(norm.training);
        return swapped;
    }

    static Mlp Reference(Mlp mlp)
    {
        if (mlp is not FastMlp) return mlp;
        var plain = new Mlp(mlp);
        plain.train(mlp.training);
        return plain;
    }

    /// <summary>
    /// The --embeddings-on-host rule: move an untied, frozen input embedding to mapped host memory
    /// (<see cref="HostEmbedding"/>) when asked, or for auto with gradient checkpointing on CUDA (the setting chosen for
    /// least memory). Returns what happened, for the log (null: nothing was asked).
    /// </summary>
    public static string? PlaceEmbeddings(CausalLM model, string mode, bool checkpointing)
    {
        if (!WantsForMemory(mode, "`embeddings_on_host`", model, checkpointing)) return null;
        if (model.Config.TieWordEmbeddings) return "input embeddings stay on the GPU: the LM head shares them";
        var table = model.model.embed_tokens;
        if (table is HostEmbedding) return "input embeddings in host memory (moved before)";
        long bytes = table.weight.numel() * table.weight.ElementSize;
        string size = bytes >= 1L << 30 ? $"{bytes / (double)(1L << 30):F2} GiB" : $"{bytes / (double)(1L << 20):F1} MiB";
        var moved = HostEmbedding.TryMove(table, out var why);
        if (moved is null) return $"input embeddings stay on the GPU: {why}";
        model.model.ReplaceChild(nameof(model.model.embed_tokens), moved, keepPlace: true);
        return $"input embeddings in host memory ({size} of device memory freed; each step reads its rows over PCIe)";
    }

    /// <summary>An auto|on|off memory option: auto means with gradient checkpointing on CUDA, the setting chosen for least memory.</summary>
    static bool WantsForMemory(string mode, string option, CausalLM model, bool checkpointing) => mode switch
    {
        "on" => true,
        "off" => false,
        "auto" => checkpointing && model.Device.type == TorchSharp.DeviceType.CUDA,
        _ => throw new ArgumentException($"{option} must be auto, on or off, not '{mode}'"),
    };

    /// <summary>
    /// The --offload-checkpoints rule: with checkpointing, each layer's checkpoint (input and mid-layer residual) waits
    /// for backward in page-locked host memory (<see cref="CheckpointOffload"/>); auto: on CUDA. Only the fused
    /// training path's lean replay uses it. <paramref name="mlpLayers"/>: how many layers' kept gate/up go too
    /// (<see cref="CheckpointOffload.MlpLayers"/>). Returns a line for the log, or null when nothing was asked.
    /// </summary>
    public static string? PlaceCheckpoints(CausalLM model, string mode, bool checkpointing, int mlpLayers = 0)
    {
        if (!WantsForMemory(mode, "`offload_checkpoints`", model, checkpointing)) return null;
        if (!checkpointing || model.model.Runner is not CheckpointRunner runner)
            return "checkpoints stay on the device: there are none without `gradient_checkpointing`";
        if (Declines(model) is not null)
            return "checkpoints stay on the device: offloading them needs the fast modules' lean replay, which this model's family declines";
        var offload = CheckpointOffload.TryCreate(model.Device, out var why);
        if (offload is null) return $"checkpoints stay on the device: {why}";
        offload.MlpLayers = mlpLayers;
        runner.Offload = offload;
        string mlp = mlpLayers > 0 ? $", and the kept gate/up of up to {mlpLayers} layers (one layer in {offload.MlpStride}, from the first)" : "";
        return $"layer checkpoints wait for backward in host memory (all but the last {offload.DeviceLayers} layers{mlp}; copied out and back beside the compute)";
    }
}
