using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// Moves what checkpointed layers keep for backward besides gate/up (each layer's input and mid-layer residual, two
/// [tokens, hidden] tensors) to page-locked host memory while the forward goes on, and copies each layer's back a few
/// layers before its backward reads it. The copies run on a <see cref="CopyStream"/> beside the compute (the GPU's copy
/// engines work in parallel with its SMs), so they cost PCIe time rather than step time as long as a layer's copies take
/// less than a layer's compute: on Llama-3-8B at 2 × 2048 tokens, 64 MiB per layer, ~2 ms at 30 GB/s, against ~3 ms of
/// forward and ~6 ms of backward per layer. The step's peak (the start of backward) then holds a few layers' checkpoints
/// instead of every layer's, 2 GiB less on Llama-3-8B, which <see cref="CheckpointRunner.KeepBytes"/> can spend on
/// gate/up (each 224 MiB kept saves a replayed GEMM of ~1.4 ms).
/// <para>
/// The host buffers live as long as this object: a CUDA graph captured with the copies reads and writes them at every
/// replay. On a CPU model the copies are plain synchronous clones, so the bookkeeping runs (and is tested) everywhere.
/// </para>
/// </summary>
public sealed class CheckpointOffload : IDisposable
{
    /// <summary>The last layers' stashes stay on the device: backward reads them first.</summary>
    public int DeviceLayers { get; set; } = 2;
    /// <summary>Forward: a layer's device copies are freed this many layers later, giving its copies that long to finish.</summary>
    public int ReleaseLag { get; set; } = 3;
    /// <summary>Backward: a layer's stash starts copying back this many layers before its backward.</summary>
    public int PrefetchAhead { get; set; } = 1;
    /// <summary>
    /// How many layers' kept gate/up outputs go to host memory too: every <see cref="MlpStride"/>-th layer from the first
    /// (the first layers' wait longest for their backward). Gate/up are 2 · intermediate / hidden times (7× on Llama-3-8B)
    /// the bytes of a layer's input and mid-layer residual, so they are spread out for the copy stream to keep up with
    /// the compute: at 55 GB/s (PCIe 5 on an H100) a Llama-3-8B layer's 302 MB take 5.5 ms, a layer's forward ~2.8 ms.
    /// What leaves costs no device memory, so <see cref="CheckpointRunner.KeepBytes"/> goes further.
    /// </summary>
    public int MlpLayers { get; set; }
    /// <summary>Layers between two whose gate/up go to host memory (see <see cref="MlpLayers"/>).</summary>
    public int MlpStride { get; set; } = 3;

    /// <summary>Whether layer <paramref name="layer"/> of <paramref name="layers"/> sends its kept gate/up to host memory.</summary>
    internal bool MlpLeaves(int layer, int layers) =>
        layer < layers - DeviceLayers && layer % MlpStride == 0 && layer / MlpStride < MlpLayers;

    readonly CopyStream? _copies; // null for a CPU model
    readonly Dictionary<(int Layer, int Slot), Buffer> _buffers = [];
    readonly Dictionary<int, (IntPtr Out, IntPtr In)> _events = [];

    /// <summary>Host memory reserved so far (for reports).</summary>
    public long HostBytes => _buffers.Values.Sum(b => b.Bytes);

    /// <summary>A host copy of one stored tensor: page-locked memory (CUDA) or a plain tensor (CPU).</summary>
    sealed class Buffer
    {
        public long Bytes;
        public IntPtr Pinned;
        public Tensor? Cpu;
    }

    CheckpointOffload(CopyStream? copies) => _copies = copies;

    /// <summary>For a model on <paramref name="device"/>; null with why not when a CUDA copy stream cannot be made.</summary>
    public static CheckpointOffload? TryCreate(Device device, out string? why)
    {
        why = null;
        if (device.type != TorchSharp.DeviceType.CUDA) return new CheckpointOffload(null);
        var copies = CopyStream.TryCreate(out why);
        return copies is null ? null : new CheckpointOffload(copies);
    }

    /// <summary>Tensors copied back to the device so far (for tests: proves the round trip ran).</summary>
    public long Restored { get; private set; }

    /// <summary>Starts one forward's bookkeeping over <paramref name="layers"/> layers.</summary>
    internal Pass Begin(int layers) => new(this, layers);

    (IntPtr Out, IntPtr In) Events(int layer)
    {
        if (!_events.TryGetValue(layer, out var e)) _events[layer] = e = (_copies!.NewEvent(), _copies.NewEvent());
        return e;
    }

    /// <summary>
    /// The host buffer of a layer's stored tensor. A buffer only grows, and a grown-out one is kept (not freed): a CUDA
    /// graph captured earlier may still copy into it.
    /// </summary>
    Buffer HostBuffer(int layer, int slot, long bytes)
    {
        if (_buffers.TryGetValue((layer, slot), out var b) && b.Bytes >= bytes) return b;
        b = new Buffer { Bytes = bytes, Pinned = _copies?.AllocateHost(bytes) ?? IntPtr.Zero };
        _buffers[(layer, slot)] = b;
        return b;
    }

    public void Dispose()
    {
        foreach (var b in _buffers.Values) b.Cpu?.Dispose();
        _buffers.Clear();
        _copies?.Dispose(); // frees the page-locked buffers after a synchronisation
    }

    /// <summary>One forward and its backward: which layers' stashes are where.</summary>
    internal sealed class Pass(CheckpointOffload owner, int layers)
    {
        enum Where { Device, CopyingOut, Host, CopyingIn }

        readonly LayerStash?[] _stashes = new LayerStash?[layers];
        readonly Where[] _where = new Where[layers];
        readonly int[] _slots = new int[layers]; // how many of a stash's stored tensors leave (see LayerStash.Stored)

        /// <summary>
        /// After layer <paramref name="layer"/>'s forward: starts copying its stash out (unless it is one of the last
        /// layers) and frees the device copies of the layer <see cref="ReleaseLag"/> back. Returns whether the stash's
        /// tensors leave the device (the caller then drops its own handles on the layer's input).
        /// </summary>
        public bool AfterForward(int layer, LayerStash stash)
        {
            _stashes[layer] = stash;
            stash.Offload = this;
            _slots[layer] = owner.MlpLeaves(layer, layers) && stash.KeepMlp ? 4 : 2;
            bool leaves = layer < layers - owner.DeviceLayers && Enumerable.Range(0, _slots[layer])
                .All(s => stash.Stored(s) is { } t && t.is_contiguous());
            if (leaves) CopyOut(layer, stash);
            if (layer - owner.ReleaseLag >= 0) Release(layer - owner.ReleaseLag);
            return leaves;
        }

        /// <summary>
        /// After the last layer: frees every device copy still waiting for its copy out. The copy stream keeps up with
        /// the forward, so by now the copies are done and the wait costs nothing; the loss then runs with less memory.
        /// </summary>
        public void EndForward()
        {
            for (int i = 0; i < layers; i++) Release(i);
        }

        /// <summary>
        /// Before layer <paramref name="layer"/>'s replay: starts the next layers' copies back (a layer further ahead for
        /// a layer whose gate/up left too: its copy takes longer), then waits for its own.
        /// </summary>
        public void BeforeBackward(int layer)
        {
            CopyIn(layer);
            for (int j = layer - 1; j >= Math.Max(0, layer - owner.PrefetchAhead - 1); j--)
                if (layer - j <= owner.PrefetchAhead || _slots[j] > 2) CopyIn(j);
            if (_where[layer] != Where.CopyingIn) return;
            owner._copies?.Await(owner.Events(layer).In);
            _where[layer] = Where.Device;
        }

        void CopyOut(int layer, LayerStash stash)
        {
            var copies = owner._copies;
            copies?.WaitForCurrent();
            for (int s = 0; s < _slots[layer]; s++)
            {
                var t = stash.Stored(s)!;
                var buffer = owner.HostBuffer(layer, s, t.numel() * t.ElementSize);
                if (copies is null)
                {
                    buffer.Cpu?.Dispose();
                    buffer.Cpu = t.clone().DetachFromDisposeScope();
                }
                else copies.ToHost(buffer.Pinned, t);
            }
            copies?.Signal(owner.Events(layer).Out);
            _where[layer] = Where.CopyingOut;
        }

        void Release(int layer)
        {
            if (_where[layer] != Where.CopyingOut) return;
            owner._copies?.Await(owner.Events(layer).Out); // the memory goes back to the allocator only after its copy
            _stashes[layer]!.DropStored(_slots[layer]);
            _where[layer] = Where.Host;
        }

        void CopyIn(int layer)
        {
            if (_where[layer] != Where.Host) return;
            var copies = owner._copies;
            var stash = _stashes[layer]!;
            var restored = new Tensor[_slots[layer]];
            for (int s = 0; s < restored.Length; s++)
            {
                var (shape, dtype, device) = stash.StoredShape(s);
                var buffer = owner._buffers[(layer, s)];
                restored[s] = copies is null
                    ? buffer.Cpu!.clone().DetachFromDisposeScope()
                    : empty(shape, dtype, device).DetachFromDisposeScope();
            }
            // The new tensors may reuse blocks that work queued on the current stream still reads: copy after it.
            copies?.WaitForCurrent();
            for (int s = 0; s < restored.Length && copies is not null; s++) copies.ToDevice(restored[s], owner._buffers[(layer, s)].Pinned);
            copies?.Signal(owner.Events(layer).In);
            stash.RestoreStored(restored);
            owner.Restored += restored.Length;
            _where[layer] = Where.CopyingIn;
        }
    }
}
