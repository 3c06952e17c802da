using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Distributed;

/// <summary>
/// Data parallelism's gradient exchange, as PyTorch DDP lays it out: the trainable parameters (LoRA A/B, DoRA
/// magnitudes, a score head) are grouped in reverse registration order — the order backward produces their gradients —
/// into buckets of about <see cref="DefaultBucketBytes"/> of one dtype and device; a bucket's gradients are flattened
/// into one buffer, summed over the ranks in one all-reduce and copied back. Few large collectives instead of hundreds
/// of small ones (a 32-layer LoRA has 448 tensors).
/// <para>
/// When a bucket goes: <see cref="MarkReady"/> counts a parameter's gradient as final and hands back its bucket once all
/// of the bucket's are. The trainer calls it after the last micro-batch's backward, in reverse registration order
/// (<see cref="ReduceAll"/>), so buckets go one after the other while the earlier ones' all-reduces run on the stream.
/// Why not from inside backward, overlapped with it, as DDP does: TorchSharp 0.107 exposes no per-parameter
/// post-accumulate-grad hook, and with gradient accumulation only the last micro-batch's gradients are final. The
/// bookkeeping is the one a hook would drive (a follow-up: overlap via autograd hooks once TorchSharp has them).
/// </para>
/// </summary>
public sealed class GradientBuckets : IDisposable
{
    /// <summary>DDP's default bucket_cap_mb (25 MB).</summary>
    public const long DefaultBucketBytes = 25L * 1024 * 1024;

    /// <summary>Where one parameter's gradient lives in its bucket's flat buffer.</summary>
    public sealed record Slot(int Parameter, int Bucket, long Offset, long Count);

    /// <summary>One all-reduce: the parameters it carries (indices into the registration order) and its flat size.</summary>
    public sealed class Bucket
    {
        internal Bucket(int index, ScalarType dtype, Device device, long elementBytes) => (Index, DType, Device, ElementBytes) = (index, dtype, device, elementBytes);
        public int Index { get; }
        public ScalarType DType { get; }
        public Device Device { get; }
        public long ElementBytes { get; }
        public List<Slot> Slots { get; } = [];
        public long Count => Slots.Count == 0 ? 0 : Slots[^1].Offset + Slots[^1].Count;
        public long Bytes => Count * ElementBytes;
        internal int Pending;
        internal Tensor? Buffer;
    }

    readonly IReadOnlyList<Parameter> _params;
    readonly Slot[] _slots;

    /// <summary>The buckets in the order they are reduced (the first holds the last registered parameters).</summary>
    public IReadOnlyList<Bucket> Buckets { get; }

    /// <summary>Assigns <paramref name="parameters"/> (registration order) to buckets of at most <paramref name="capBytes"/> (a larger tensor gets one of its own).</summary>
    public GradientBuckets(IReadOnlyList<(string name, Parameter param)> parameters, long capBytes = DefaultBucketBytes)
    {
        if (capBytes <= 0) throw new ArgumentOutOfRangeException(nameof(capBytes));
        _params = parameters.Select(p => p.param).ToList();
        _slots = new Slot[_params.Count];
        var buckets = new List<Bucket>();
        // One open bucket per (dtype, device): a bucket is one flat buffer, so it cannot mix them.
        var open = new Dictionary<(ScalarType, string), Bucket>();
        for (int i = _params.Count - 1; i >= 0; i--)
        {
            var p = _params[i];
            var key = (p.dtype, p.device.ToString());
            long n = p.numel();
            if (!open.TryGetValue(key, out var b) || (b.Count > 0 && (b.Count + n) * p.ElementSize > capBytes))
            {
                b = new Bucket(buckets.Count, p.dtype, p.device, p.ElementSize);
                buckets.Add(b);
                open[key] = b;
            }
            var slot = new Slot(i, b.Index, b.Count, n);
            b.Slots.Add(slot);
            _slots[i] = slot;
        }
        Buckets = buckets;
        Reset();
    }

    /// <summary>Where parameter <paramref name="index"/> (registration order) lives.</summary>
    public Slot SlotOf(int index) => _slots[index];

    /// <summary>Starts a new round: no gradient is final.</summary>
    public void Reset()
    {
        foreach (var b in Buckets) b.Pending = b.Slots.Count;
    }

    /// <summary>Counts parameter <paramref name="index"/>'s gradient as final; returns its bucket when that makes the bucket complete, else null.</summary>
    public Bucket? MarkReady(int index)
    {
        var b = Buckets[_slots[index].Bucket];
        if (b.Pending <= 0) throw new InvalidOperationException($"parameter {index} marked ready twice in one round");
        return --b.Pending == 0 ? b : null;
    }

    /// <summary>Flattens the bucket's gradients into its buffer, sums it over the ranks with <paramref name="allReduceSum"/> and copies the sums back into the gradients.</summary>
    public void Reduce(Bucket b, Action<Tensor> allReduceSum)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        b.Buffer ??= empty(b.Count, b.DType, b.Device).DetachFromDisposeScope();
        foreach (var s in b.Slots)
        {
            var g = _params[s.Parameter].grad ?? throw new InvalidOperationException($"trainable parameter {s.Parameter} has no gradient to all-reduce");
            b.Buffer.narrow(0, s.Offset, s.Count).copy_(g.reshape(-1));
        }
        allReduceSum(b.Buffer);
        foreach (var s in b.Slots)
        {
            var g = _params[s.Parameter].grad!;
            g.copy_(b.Buffer.narrow(0, s.Offset, s.Count).view(g.shape));
        }
    }

    /// <summary>After backward: marks every gradient ready in reverse registration order and reduces each bucket as it completes.</summary>
    public void ReduceAll(Action<Tensor> allReduceSum)
    {
        Reset();
        for (int i = _params.Count - 1; i >= 0; i--)
            if (MarkReady(i) is { } b) Reduce(b, allReduceSum);
    }

    /// <summary>Frees the flat buffers.</summary>
    public void Dispose()
    {
        foreach (var b in Buckets) { b.Buffer?.Dispose(); b.Buffer = null; }
    }
}
