using static TorchSharp.torch;

namespace LoraKit.Models;

#pragma warning disable IDE1006 // field names are checkpoint keys

/// <summary>
/// The transformer trunk (HF's <c>model.*</c>): embeddings (times √hidden for Gemma), decoder layers, final norm. Each
/// layer gets the mask and the RoPE cos/sin of its layer type (<see cref="ModelConfig.LayerTypes"/>); layers of one type
/// share them.
/// </summary>
public sealed class DecoderModel : ContainerModule
{
    public Embedding embed_tokens;
    public TorchSharp.Modules.ModuleList<DecoderLayer> layers;
    public RmsNorm norm;
    readonly RotaryEmbedding _rope;
    ILayerRunner _runner = PlainLayerRunner.Instance;

    /// <summary>The configuration the model was built from.</summary>
    public ModelConfig Config { get; }

    /// <summary>
    /// How the layer stack runs (<see cref="PlainLayerRunner"/> unless training plugs in another). Setting it disposes
    /// the previous runner when that one is disposable; the model disposes the last one.
    /// </summary>
    public ILayerRunner Runner
    {
        get => _runner;
        set
        {
            if (!ReferenceEquals(_runner, value)) (_runner as IDisposable)?.Dispose();
            _runner = value;
        }
    }

    public DecoderModel(string name, WeightSource w, ModelConfig c) : base("DecoderModel")
    {
        Config = c;
        embed_tokens = new Embedding(name + ".embed_tokens", w, c.VocabSize, c.HiddenSize);
        var list = new List<DecoderLayer>();
        for (int i = 0; i < c.NumHiddenLayers; i++) list.Add(new DecoderLayer($"{name}.layers.{i}", w, c));
        layers = nn.ModuleList(list.ToArray());
        norm = new RmsNorm(name + ".norm", w, c.HiddenSize, c.RmsNormEps, c.Norm);
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
        var h = FamilyOps.ScaleEmbedding(embed_tokens.forward(ids), Config.EmbeddingScale);
        var (cos, sin) = LayerRope(positions, h.dtype);
        var masks = LayerMasks(t, past, attentionMask, ids.device, segments);
        h = _runner.Run(this, h, cos, sin, masks, cache);
        return norm.forward(h).MoveToOuterDisposeScope();
    }

    /// <summary>Each layer's RoPE cos and sin, computed once per layer type.</summary>
    (Tensor[] cos, Tensor[] sin) LayerRope(Tensor positions, ScalarType dtype)
    {
        var byType = new Dictionary<string, (Tensor cos, Tensor sin)>();
        var (cos, sin) = (new Tensor[layers.Count], new Tensor[layers.Count]);
        for (int i = 0; i < cos.Length; i++)
        {
            string type = Config.LayerTypes[i];
            if (!byType.TryGetValue(type, out var table)) byType[type] = table = _rope.CosSin(positions, dtype, type);
            (cos[i], sin[i]) = table;
        }
        return (cos, sin);
    }

    /// <summary>Each layer's attention mask, one per sliding window size (null: full attention) shared by its layers.</summary>
    Tensor?[] LayerMasks(long t, long past, Tensor? attentionMask, Device device, Tensor? segments)
    {
        var byWindow = new Dictionary<int, Tensor?>();
        var masks = new Tensor?[layers.Count];
        for (int i = 0; i < masks.Length; i++)
        {
            int? window = Config.SlidingWindows[i];
            int key = window ?? -1;
            if (!byWindow.TryGetValue(key, out var mask))
                byWindow[key] = mask = AttentionMask.Build(t, past, window, attentionMask, device, segments);
            masks[i] = mask;
        }
        return masks;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _rope.Dispose();
            (_runner as IDisposable)?.Dispose();
        }
        base.Dispose(disposing);
    }

    /// <summary>Positions count real tokens only, so left-padded rows start at 0 like transformers' generate.</summary>
    static Tensor PositionIds(Tensor? attentionMask, long b, long t, long past, Device device)
    {
        if (attentionMask is null) return ScalarOps.Range(past, past + t, ScalarType.Int64, device).unsqueeze(0).expand(b, t);
        var pos = attentionMask.to(ScalarType.Int64).cumsum(1).Minus(1L);
        pos = pos.ClampMin(0L);
        return pos[TensorIndex.Colon, TensorIndex.Slice(past, past + t)];
    }
}
