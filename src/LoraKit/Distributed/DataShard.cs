namespace LoraKit.Distributed;

/// <summary>
/// Which samples of the global batch a rank trains on. The data is one endless, seeded stream of samples (positions
/// 0, 1, 2, … as <c>Batches</c> orders them); an optimizer step consumes <see cref="SamplesPerStep"/> of them: its
/// grad_accum global micro-batches of <see cref="BatchSize"/> × <see cref="WorldSize"/> samples each, rank r taking the
/// r-th run of <see cref="BatchSize"/> inside every one. So the ranks' shares are disjoint and, together, exactly the
/// micro-batches one process with batch size <see cref="BatchSize"/> × <see cref="WorldSize"/> would take: N GPUs ×
/// batch b see the same samples per step as 1 GPU × batch N·b. A data position is counted in global samples, so a run
/// can resume with another number of ranks.
/// </summary>
/// <param name="Rank">this rank (0 … WorldSize−1)</param>
/// <param name="WorldSize">ranks in the group</param>
/// <param name="BatchSize">samples per micro-batch on each rank</param>
/// <param name="GradAccum">micro-batches per optimizer step on each rank</param>
public sealed record DataShard(int Rank, int WorldSize, int BatchSize, int GradAccum)
{
    /// <summary>The whole of one process's data: rank 0 of 1.</summary>
    public static DataShard Single(int batchSize, int gradAccum) => new(0, 1, batchSize, gradAccum);

    /// <summary>Samples in one micro-batch over all ranks.</summary>
    public long GlobalMicroBatch => (long)BatchSize * WorldSize;

    /// <summary>Samples one optimizer step consumes over all ranks (the global batch).</summary>
    public long SamplesPerStep => GlobalMicroBatch * GradAccum;

    /// <summary>The first stream position of this rank's micro-batch <paramref name="micro"/> of the step that starts at global position <paramref name="position"/>.</summary>
    public long Start(long position, int micro)
    {
        if (micro < 0 || micro >= GradAccum) throw new ArgumentOutOfRangeException(nameof(micro), micro, $"a step has {GradAccum} micro-batches");
        return position + micro * GlobalMicroBatch + (long)Rank * BatchSize;
    }

    /// <summary>This rank's stream positions in the step starting at <paramref name="position"/>, micro-batch by micro-batch.</summary>
    public IEnumerable<long[]> Positions(long position) =>
        Enumerable.Range(0, GradAccum).Select(i => Enumerable.Range(0, BatchSize).Select(j => Start(position, i) + j).ToArray());
}
