namespace LoraKit.Runtime.Cuda;

/// <summary>
/// A piece of GPU work recorded once as a CUDA graph (driver API stream capture) and replayed with one launch: no host
/// work per kernel, so a step whose host side is slower than its GPU side stops leaving the GPU idle. TorchSharp exposes
/// no capture API, so this captures libtorch's current stream directly (<see cref="CudaStreams.UseSideStream"/>).
/// <para>
/// Without PyTorch's private graph memory pool, the caller keeps the rules that pool would enforce: every tensor that
/// outlives a replay (parameters, grads, optimizer state, the inputs the graph reads and the outputs it writes) exists
/// before capture and stays alive while the graph is used; between replays only temporaries are allocated. The captured
/// work must be static: same shapes, no host synchronisation, no host-to-device copy, no random numbers.
/// </para>
/// </summary>
internal sealed class CudaGraph : IDisposable
{
    delegate int BeginCaptureFn(IntPtr stream, int mode);
    delegate int EndCaptureFn(IntPtr stream, out IntPtr graph);
    delegate int InstantiateFn(out IntPtr exec, IntPtr graph, ulong flags);
    delegate int LaunchFn(IntPtr exec, IntPtr stream);
    delegate int DestroyFn(IntPtr handle);

    sealed record Api(BeginCaptureFn BeginCapture, EndCaptureFn EndCapture, InstantiateFn Instantiate, LaunchFn Launch, DestroyFn DestroyExec, DestroyFn DestroyGraph);

    static readonly Lazy<Api> Driver = new(() => new Api(CudaDriver.Bind<BeginCaptureFn>("cuStreamBeginCapture_v2"),
        CudaDriver.Bind<EndCaptureFn>("cuStreamEndCapture"), CudaDriver.Bind<InstantiateFn>("cuGraphInstantiateWithFlags"),
        CudaDriver.Bind<LaunchFn>("cuGraphLaunch"), CudaDriver.Bind<DestroyFn>("cuGraphExecDestroy"), CudaDriver.Bind<DestroyFn>("cuGraphDestroy")));

    IntPtr _graph, _exec;
    readonly IntPtr _stream;

    CudaGraph(IntPtr graph, IntPtr exec, IntPtr stream) => (_graph, _exec, _stream) = (graph, exec, stream);

    /// <summary>Records what <paramref name="work"/> queues on the current stream (nothing runs now: replay runs it).</summary>
    public static CudaGraph Capture(Action work)
    {
        var stream = CudaStreams.Current;
        if (stream == IntPtr.Zero) throw new InvalidOperationException("CUDA graph capture needs a side stream (CudaStreams.UseSideStream)");
        var api = Driver.Value;
        // Relaxed: the autograd engine's thread and the allocator may make calls that the stricter modes reject.
        const int Relaxed = 2;
        CudaDriver.Check(api.BeginCapture(stream, Relaxed), "cuStreamBeginCapture");
        Exception? failed = null;
        try { work(); }
        catch (Exception e) { failed = e; }
        int rc = api.EndCapture(stream, out var graph);
        if (failed != null || rc != 0)
        {
            if (graph != IntPtr.Zero) api.DestroyGraph(graph);
            throw new InvalidOperationException(
                "the step could not be captured as a CUDA graph (it synchronises with the host, copies from host memory or " +
                $"draws random numbers){(rc != 0 ? $"; cuStreamEndCapture error {rc}" : "")}", failed);
        }
        int irc = api.Instantiate(out var exec, graph, 0);
        if (irc != 0)
        {
            api.DestroyGraph(graph);
            CudaDriver.Check(irc, "cuGraphInstantiate");
        }
        return new CudaGraph(graph, exec, stream);
    }

    /// <summary>Queues the recorded work on the stream it was captured from.</summary>
    public void Replay()
    {
        ObjectDisposedException.ThrowIf(_exec == IntPtr.Zero, this);
        CudaDriver.Check(Driver.Value.Launch(_exec, _stream), "cuGraphLaunch");
    }


    public void Dispose()
    {
        if (_exec != IntPtr.Zero) Driver.Value.DestroyExec(_exec);
        if (_graph != IntPtr.Zero) Driver.Value.DestroyGraph(_graph);
        (_exec, _graph) = (IntPtr.Zero, IntPtr.Zero);
    }
}
