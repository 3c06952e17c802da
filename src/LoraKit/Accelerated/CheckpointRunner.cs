using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// Runs a <see cref="DecoderModel"/>'s layers with activation checkpointing while training with gradients (each layer
/// through <see cref="LayerCheckpoint"/>, lean where <see cref="LeanLayer.Applies"/>), and as the plain loop otherwise
/// (evaluation, generation with a cache). Owns its <see cref="Offload"/>.
/// </summary>
public sealed class CheckpointRunner : ILayerRunner, IDisposable
{
    CheckpointOffload? _offload;

    /// <summary>
    /// Device memory (bytes) the layers may spend keeping their gate/up outputs, so that their replay skips those two
    /// GEMMs (about half a layer's recompute; see <see cref="LayerStash"/>). The last layers keep them: backward starts
    /// there and frees what they kept before it reaches the layers that recompute, so the peak holds one layer's
    /// recompute less than if the first layers kept.
    /// </summary>
    public long KeepBytes { get; set; }

    /// <summary>The private random stream dropout draws from (see <see cref="RngStream"/>), replayed by checkpointed layers.</summary>
    public RngStream? Rng { get; set; }

    /// <summary>
    /// Moves the layers' inputs and mid-layer residuals to host memory between forward and backward (see
    /// <see cref="CheckpointOffload"/>); null keeps them on the device. Setting it disposes the previous one.
    /// </summary>
    public CheckpointOffload? Offload
    {
        get => _offload;
        set
        {
            if (!ReferenceEquals(_offload, value)) _offload?.Dispose();
            _offload = value;
        }
    }

    public Tensor Run(DecoderModel model, Tensor h, Tensor[] cos, Tensor[] sin, Tensor?[] masks, KvCache? cache)
    {
        if (!(model.training && cache is null && is_grad_enabled())) return PlainLayerRunner.Instance.Run(model, h, cos, sin, masks, cache);
        var layers = model.layers;
        var c = model.Config;
        // A checkpointed layer is a custom autograd function whose only tensor input is h; with a frozen embedding h
        // would not require grad and the function's output would get no graph (transformers' enable_input_require_grads).
        if (!h.requires_grad) h = h.detach().requires_grad_(true);
        long tokenBytes = h.shape[0] * h.shape[1] * h.ElementSize;
        var lean = Enumerable.Range(0, layers.Count).Select(i => LeanLayer.Applies(layers[i])).ToArray();
        var (keepMlp, keepQkv) = KeepingLayers(lean, 2 * c.IntermediateSize * tokenBytes, (c.NumAttentionHeads + 2 * c.NumKeyValueHeads) * c.HeadDim * tokenBytes);
        var offload = _offload?.Begin(layers.Count);
        for (int i = 0; i < layers.Count; i++)
        {
            var stash = lean[i] ? new LayerStash(keepMlp.Contains(i), keepQkv.Contains(i)) : null;
            var input = h;
            h = LayerCheckpoint.Run(layers[i], h, cos[i], sin[i], masks[i], i, stash, Rng);
            // An offloaded input's device memory goes once its copy is done, so the caller's scope must not hold it either.
            if (stash is not null && offload is not null && offload.AfterForward(i, stash)) input.Dispose();
            MemoryTrace.Mark("forward layer {0}", i, h.device);
        }
        offload?.EndForward();
        return h;
    }

    /// <summary>
    /// The layers that keep gate/up within <see cref="KeepBytes"/> (the last ones that can use it), and with what is left
    /// once every layer keeps gate/up, those that keep q/k/v too: gate/up saves more GEMM time per byte (its GEMMs' inner
    /// dimension is the same, and the SwiGLU recompute comes with them). Gate/up that <see cref="Offload"/> sends to host
    /// memory cost no device memory.
    /// </summary>
    (HashSet<int> Mlp, HashSet<int> Qkv) KeepingLayers(bool[] leanLayers, long mlpBytes, long qkvBytes)
    {
        var lean = Enumerable.Range(0, leanLayers.Length).Where(i => leanLayers[i]).Reverse().ToList();
        long left = KeepBytes;
        var mlp = new HashSet<int>();
        foreach (int i in lean)
        {
            long cost = _offload?.MlpLeaves(i, leanLayers.Length) == true ? 0 : mlpBytes;
            if (cost > left) continue; // an earlier layer's may still be free
            left -= cost;
            mlp.Add(i);
        }
        long nQkv = mlp.Count < lean.Count ? 0 : Math.Min(left / Math.Max(qkvBytes, 1), lean.Count);
        return (mlp, lean.Take((int)nQkv).ToHashSet());
    }

    public void Dispose() => Offload = null;
}
