using static TorchSharp.torch;

namespace LoraKit.Data;

/// <summary>A padded micro-batch on a device: ids, labels (-100 = no loss), attention mask, and packing segments.</summary>
public sealed class Batch : IDisposable
{
    public required Tensor InputIds { get; init; }
    public required Tensor Labels { get; init; }
    public required Tensor AttentionMask { get; init; }
    /// <summary>[B, T] sample index inside a packed row (attention stays inside a segment), or null when not packed.</summary>
    public Tensor? Segments { get; init; }
    /// <summary>[B, T] position ids restarting at each packed segment, or null (positions 0…T−1).</summary>
    public Tensor? Positions { get; init; }
    public required long TargetTokens { get; init; }
    public required long Tokens { get; init; }

    public void Dispose()
    {
        InputIds.Dispose(); Labels.Dispose(); AttentionMask.Dispose(); Segments?.Dispose(); Positions?.Dispose();
    }
}

/// <summary>
/// Deterministic batching: sample order is a function of (seed, epoch) only, so a run can resume from a position
/// (the data cursor) and see exactly the same batches. Rows are right-padded; labels of padding are -100.
/// </summary>
internal sealed class Batches(IReadOnlyList<Sample> samples, int batchSize, bool shuffle, int seed)
{
    readonly Dictionary<long, int[]> _orders = [];

    public int Count => samples.Count;

    /// <summary>Samples for micro-batch number <paramref name="index"/> (positions index·B … index·B+B−1 of the endless stream).</summary>
    public List<Sample> Take(long index) => TakeAt(index * batchSize, batchSize);

    /// <summary>
    /// The <paramref name="count"/> samples at stream positions <paramref name="position"/> onwards (the stream is every
    /// epoch's seeded order one after the other). A data-parallel rank takes its share of a global micro-batch this way.
    /// </summary>
    public List<Sample> TakeAt(long position, int count)
    {
        var result = new List<Sample>(count);
        for (long p = position; p < position + count; p++)
        {
            long epoch = p / samples.Count;
            result.Add(samples[Order(epoch)[p % samples.Count]]);
        }
        return result;
    }

    public double EpochAt(long index) => (double)(index * batchSize) / samples.Count;

    int[] Order(long epoch)
    {
        if (_orders.TryGetValue(epoch, out var o)) return o;
        o = Enumerable.Range(0, samples.Count).ToArray();
        // A fixed formula, not HashCode.Combine: that is randomised per process and would break resume.
        if (shuffle) new Random((int)((seed * 1_000_003L + epoch * 7919L) & int.MaxValue)).Shuffle(o);
        if (_orders.Count > 4) _orders.Clear();
        return _orders[epoch] = o;
    }

    /// <summary>Pads a list of samples into tensors on <paramref name="device"/>.</summary>
    public static Batch Collate(IReadOnlyList<Sample> rows, int padId, Device device)
    {
        bool packed = rows.Any(r => r.Segments != null);
        int t = rows.Max(r => r.InputIds.Length);
        int b = rows.Count;
        var ids = new long[b * t];
        var labels = new long[b * t];
        var mask = new long[b * t];
        var seg = packed ? new long[b * t] : null;
        var pos = packed ? new long[b * t] : null;
        long targets = 0, tokens = 0;
        for (int i = 0; i < b; i++)
        {
            var r = rows[i];
            for (int j = 0; j < t; j++)
            {
                bool real = j < r.InputIds.Length;
                ids[i * t + j] = real ? r.InputIds[j] : padId;
                labels[i * t + j] = real ? r.Labels[j] : Sample.IgnoreIndex;
                mask[i * t + j] = real ? 1 : 0;
                if (seg != null)
                {
                    seg[i * t + j] = real ? r.Segments?[j] ?? 0 : -1;
                    pos![i * t + j] = j == 0 || seg[i * t + j] != seg[i * t + j - 1] ? 0 : pos[i * t + j - 1] + 1;
                }
            }
            tokens += r.InputIds.Length;
            targets += r.Labels.Skip(1).Count(l => l != Sample.IgnoreIndex); // the first position has nothing predicting it
        }
        return new Batch
        {
            InputIds = tensor(ids, [b, t], device: device),
            Labels = tensor(labels, [b, t], device: device),
            AttentionMask = tensor(mask, [b, t], device: device),
            Segments = seg is null ? null : tensor(seg, [b, t], device: device),
            Positions = pos is null ? null : tensor(pos, [b, t], device: device),
            TargetTokens = targets,
            Tokens = tokens,
        };
    }

    /// <summary>
    /// Packing: concatenates samples (in order) into rows of at most <paramref name="maxLength"/> tokens. Each row
    /// carries segment ids; attention and positions restart at every sample boundary, so packed samples do not see
    /// each other. A sample longer than a row was already truncated by the loader.
    /// </summary>
    public static List<Sample> Pack(IReadOnlyList<Sample> samples, int maxLength)
    {
        var rows = new List<Sample>();
        var ids = new List<int>();
        var lbl = new List<int>();
        var seg = new List<int>();
        int segment = 0, line = 0;
        void Flush()
        {
            if (ids.Count == 0) return;
            rows.Add(new Sample(ids.ToArray(), lbl.ToArray(), line) { Segments = seg.ToArray() });
            ids.Clear(); lbl.Clear(); seg.Clear(); segment = 0;
        }
        foreach (var s in samples)
        {
            if (ids.Count + s.InputIds.Length > maxLength) Flush();
            if (ids.Count == 0) line = s.Line;
            ids.AddRange(s.InputIds);
            // The first token of a packed sample must not be predicted from the previous sample's last token.
            lbl.AddRange(s.Labels.Select((l, i) => i == 0 && ids.Count > s.InputIds.Length ? Sample.IgnoreIndex : l));
            seg.AddRange(Enumerable.Repeat(segment++, s.InputIds.Length));
        }
        Flush();
        return rows;
    }
}
