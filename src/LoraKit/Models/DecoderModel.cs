using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>The transformer trunk (HF's <c>model.*</c>): embeddings, decoder layers, final norm.</summary>
public sealed class DecoderModel : nn.Module<Tensor, Tensor>
{
    public Embedding embed_tokens;
    public TorchSharp.Modules.ModuleList<DecoderLayer> layers;
    public RmsNorm norm;
    readonly ModelConfig _config;

    /// <summary>Recompute each layer's activations in backward instead of keeping them (training only).</summary>
    public bool GradientCheckpointing { get; set; }
    /// <summary>The private random stream dropout draws from (see <see cref="Runtime.RngStream"/>), replayed by checkpointed layers.</summary>
    public Runtime.RngStream? Rng { get; set; }
    /// <summary>
    /// Checkpointing: device memory (bytes) the layers may spend keeping their gate/up outputs, so that their replay skips
    /// those two GEMMs (about half a layer's recompute; see <see cref="LayerStash"/>). The last layers keep them: backward
    /// starts there and frees what they kept before it reaches the layers that recompute, so the peak holds one layer's
    /// recompute less than if the first layers kept.
    /// </summary>
    public long CheckpointKeepBytes { get; set; }
    /// <summary>
    /// Checkpointing: moves the layers' inputs and mid-layer residuals to host memory between forward and backward (see
    /// <see cref="CheckpointOffload"/>); null keeps them on the device. Owned (disposed) by this model.
    /// </summary>
    public CheckpointOffload? Offload { get; set; }
    readonly RotaryEmbedding _rope;

    public DecoderModel(string name, WeightSource w, ModelConfig c) : base("DecoderModel")
    {
        _config = c;
        embed_tokens = new Embedding(name + ".embed_tokens", w, c.VocabSize, c.HiddenSize);
        var list = new List<DecoderLayer>();
        for (int i = 0; i < c.NumHiddenLayers; i++) list.Add(new DecoderLayer($"{name}.layers.{i}", w, c));
        layers = nn.ModuleList(list.ToArray());
        norm = new RmsNorm(name + ".norm", w, c.HiddenSize, c.RmsNormEps);
        _rope = new RotaryEmbedding(c, w.Device);
        RegisterComponents();
    }

    public override Tensor forward(Tensor ids) => Forward(ids, null, null);

    /// <summary>
    /// Hidden states [B, T, hidden] for token ids [B, T].
    /// <paramref name="attentionMask"/> is [B, S] over all S = past + T positions (1 = real token, 0 = padding), or null.
    /// </summary>
    /// <paramref name="positions"/> and <paramref name="segments"/> ([B, T]) are given for packed rows.
    public Tensor Forward(Tensor ids, Tensor? attentionMask, KvCache? cache, Tensor? positions = null, Tensor? segments = null)
    {
        using var scope = NewDisposeScope();
        long b = ids.shape[0], t = ids.shape[1];
        long past = cache?.Length ?? 0;
        positions ??= PositionIds(attentionMask, b, t, past, ids.device);
        var h = embed_tokens.forward(ids);
        var (cos, sin) = _rope.CosSin(positions, h.dtype);
        bool checkpoint = GradientCheckpointing && training && cache is null && is_grad_enabled();
        // A checkpointed layer is a custom autograd function whose only tensor input is h; with a frozen embedding h
        // would not require grad and the function's output would get no graph (transformers' enable_input_require_grads).
        if (checkpoint && !h.requires_grad) h = h.detach().requires_grad_(true);
        long tokenBytes = b * t * h.ElementSize;
        var (keepMlp, keepQkv) = checkpoint
            ? KeepingLayers(2 * _config.IntermediateSize * tokenBytes, (_config.NumAttentionHeads + 2 * _config.NumKeyValueHeads) * _config.HeadDim * tokenBytes)
            : ([], []);
        var masks = new Dictionary<int, Tensor?>();
        var offload = checkpoint ? Offload?.Begin(layers.Count) : null;
        for (int i = 0; i < layers.Count; i++)
        {
            int? window = _config.SlidingWindows[i];
            int key = window ?? -1;
            if (!masks.TryGetValue(key, out var mask))
                masks[key] = mask = AttentionMask.Build(t, past, window, attentionMask, ids.device, segments);
            if (!checkpoint)
            {
                h = layers[i].Forward(h, cos, sin, mask, cache, i);
                continue;
            }
            var stash = layers[i].LeanReplayable ? new LayerStash(keepMlp.Contains(i), keepQkv.Contains(i)) : null;
            var input = h;
            h = LayerCheckpoint.Run(layers[i], h, cos, sin, mask, i, stash, Rng);
            // An offloaded input's device memory goes once its copy is done, so this scope must not hold it either.
            if (stash is not null && offload is not null && offload.AfterForward(i, stash)) input.Dispose();
            Runtime.Cuda.MemoryTrace.Mark("forward layer {0}", i, h.device);
        }
        offload?.EndForward();
        return norm.forward(h).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The layers that keep gate/up within <see cref="CheckpointKeepBytes"/> (the last ones that can use it), and with
    /// what is left once every layer keeps gate/up, those that keep q/k/v too: gate/up saves more GEMM time per byte
    /// (its GEMMs' inner dimension is the same, and the SwiGLU recompute comes with them). Gate/up that
    /// <see cref="Offload"/> sends to host memory cost no device memory.
    /// </summary>
    (HashSet<int> Mlp, HashSet<int> Qkv) KeepingLayers(long mlpBytes, long qkvBytes)
    {
        var lean = Enumerable.Range(0, layers.Count).Where(i => layers[i].LeanReplayable).Reverse().ToList();
        long left = CheckpointKeepBytes;
        var mlp = new HashSet<int>();
        foreach (int i in lean)
        {
            long cost = Offload?.MlpLeaves(i, layers.Count) == true ? 0 : mlpBytes;
            if (cost > left) continue; // an earlier layer's may still be free
            left -= cost;
            mlp.Add(i);
        }
        long nQkv = mlp.Count < lean.Count ? 0 : Math.Min(left / Math.Max(qkvBytes, 1), lean.Count);
        return (mlp, lean.Take((int)nQkv).ToHashSet());
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _rope.Dispose();
            Offload?.Dispose();
        }
        base.Dispose(disposing);
    }

    /// <summary>Positions count real tokens only, so left-padded rows start at 0 like transformers' generate.</summary>
    static Tensor PositionIds(Tensor? attentionMask, long b, long t, long past, Device device)
    {
        if (attentionMask is null) return arange(past, past + t, ScalarType.Int64, device).unsqueeze(0).expand(b, t);
        var pos = attentionMask.to(ScalarType.Int64).cumsum(1) - 1;
        pos = pos.clamp_min(0);
        return pos[TensorIndex.Colon, TensorIndex.Slice(past, past + t)];
    }
}
