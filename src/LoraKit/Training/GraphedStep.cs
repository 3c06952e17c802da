using LoraKit.Data;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// A micro-batch's forward, loss and backward (grads accumulated into the parameters' grads), captured once as a CUDA
/// graph for batches of one shape and replayed for every later batch of that shape. The host then queues one launch
/// instead of a few thousand kernels and custom-function calls; on small models the GPU otherwise waits for the host
/// (bench/NOTES.md). Each batch is copied into static input buffers first; each replay writes the loss sum into a static
/// output. Batches of another shape, and everything before the capture, run eagerly, as without a graph.
/// <para>
/// Use only inside <see cref="CudaStreams.UseSideStream"/>, with no dropout (the replay would reuse one random mask), and
/// with the optimizer's grads and state already allocated (<see cref="AdamW"/> allocates them up front); see
/// <see cref="CudaGraph"/> for why nothing long-lived may be allocated after the capture.
/// </para>
/// </summary>
public sealed class GraphedStep(Func<Batch, Tensor> lossSum, bool capture = true) : IDisposable
{
    Batch? _inputs;          // static copies of the captured shape's batch tensors
    Tensor? _loss, _scale;   // the replay's loss sum (fp32 scalar) and the factor backward scales it by
    CudaGraph? _graph;
    int _eagerRuns;

    /// <summary>Eager runs of the graph's shape before capturing (libtorch and cuBLAS set up lazily on first use).</summary>
    public int WarmupRuns { get; init; } = 1;

    /// <summary>Replays so far (for reports and tests).</summary>
    public long Replays { get; private set; }

    /// <summary>Why the step runs eagerly for good (a capture failed), or null.</summary>
    public string? Disabled { get; private set; } = capture ? null : "off";

    /// <summary>
    /// Runs backward of lossSum(<paramref name="batch"/>) × <paramref name="scale"/> and returns the loss sum (detached;
    /// the caller disposes it). Replays the graph when the batch has the captured shape.
    /// </summary>
    public Tensor Run(Batch batch, double scale)
    {
        if (_graph is null && Disabled is null)
        {
            _inputs ??= Clone(batch); // the first batch fixes the captured shape
            if (SameShape(_inputs, batch) && _eagerRuns++ >= WarmupRuns) TryCapture();
        }
        if (_graph is null || !SameShape(_inputs!, batch)) return Eager(batch, scale);
        using (no_grad())
        {
            Copy(batch, _inputs!);
            _scale!.FillInPlace(scale);
        }
        _graph.Replay();
        Replays++;
        return _loss!.alias();
    }

    Tensor Eager(Batch batch, double scale)
    {
        var loss = lossSum(batch);
        loss.Times(scale).backward();
        return loss.detach();
    }

    void TryCapture()
    {
        // Everything the graph reads or writes outside itself exists before capture and lives as long as the graph.
        var inputs = _inputs!;
        var loss = _loss = zeros([], ScalarType.Float32, inputs.InputIds.device).DetachFromDisposeScope();
        var factor = _scale = ones([], ScalarType.Float32, inputs.InputIds.device).DetachFromDisposeScope();
        try
        {
            _graph = CudaGraph.Capture(() =>
            {
                using var scope = NewDisposeScope();
                var sum = lossSum(inputs);
                (sum * factor).backward();
                using (no_grad()) loss.copy_(sum);
            });
        }
        catch (InvalidOperationException e)
        {
            Disabled = e.InnerException is { } inner ? $"{e.Message}: {inner.Message}" : e.Message;
        }
    }

    static bool SameShape(Batch a, Batch b) =>
        Same(a.InputIds, b.InputIds) && Same(a.Labels, b.Labels) && Same(a.AttentionMask, b.AttentionMask)
        && Same(a.Positions, b.Positions) && Same(a.Segments, b.Segments);

    static bool Same(Tensor? a, Tensor? b) =>
        a is null ? b is null : b is not null && a.dtype == b.dtype && a.shape.SequenceEqual(b.shape);

    static Batch Clone(Batch b) => new()
    {
        InputIds = b.InputIds.clone().DetachFromDisposeScope(), Labels = b.Labels.clone().DetachFromDisposeScope(),
        AttentionMask = b.AttentionMask.clone().DetachFromDisposeScope(),
        Positions = b.Positions?.clone().DetachFromDisposeScope(), Segments = b.Segments?.clone().DetachFromDisposeScope(),
        TargetTokens = b.TargetTokens, Tokens = b.Tokens,
    };

    static void Copy(Batch from, Batch to)
    {
        to.InputIds.copy_(from.InputIds);
        to.Labels.copy_(from.Labels);
        to.AttentionMask.copy_(from.AttentionMask);
        to.Positions?.copy_(from.Positions!);
        to.Segments?.copy_(from.Segments!);
    }

    public void Dispose()
    {
        _graph?.Dispose();
        _inputs?.Dispose();
        _loss?.Dispose();
        _scale?.Dispose();
        (_graph, _inputs, _loss, _scale) = (null, null, null, null);
    }
}
