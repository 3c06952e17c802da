using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// A CUDA stream for copies between device and page-locked host memory that run beside the compute on libtorch's
/// current stream (the GPU's copy engines work in parallel with its SMs). Events order the two streams: before a copy
/// the copy stream waits for what the current stream has queued so far; before the current stream reads a copy's result
/// or frees its source, it waits for the copy. The same calls work eagerly and inside a CUDA graph capture, where the
/// event waits fork the copy stream into the graph and join it back, and the copies become memcpy nodes (their host
/// buffers must then stay where they are for as long as the graph lives).
/// </summary>
internal sealed class CopyStream : IDisposable
{
    delegate int StreamCreateFn(out IntPtr stream, uint flags);
    delegate int HandleFn(IntPtr handle);
    delegate int EventCreateFn(out IntPtr ev, uint flags);
    delegate int EventRecordFn(IntPtr ev, IntPtr stream);
    delegate int StreamWaitEventFn(IntPtr stream, IntPtr ev, uint flags);
    delegate int ToHostFn(IntPtr host, IntPtr device, nuint bytes, IntPtr stream);
    delegate int ToDeviceFn(IntPtr device, IntPtr host, nuint bytes, IntPtr stream);
    delegate int HostAllocFn(out IntPtr host, nuint bytes, uint flags);

    sealed record Api(StreamCreateFn StreamCreate, HandleFn StreamDestroy, EventCreateFn EventCreate, HandleFn EventDestroy,
        EventRecordFn EventRecord, StreamWaitEventFn StreamWaitEvent, ToHostFn ToHost, ToDeviceFn ToDevice, HostAllocFn HostAlloc, HandleFn FreeHost);

    static readonly Lazy<Api?> Driver = new(() =>
    {
        var streamCreate = CudaDriver.TryBind<StreamCreateFn>("cuStreamCreate");
        if (streamCreate is null) return null;
        return new Api(streamCreate, CudaDriver.Bind<HandleFn>("cuStreamDestroy_v2"), CudaDriver.Bind<EventCreateFn>("cuEventCreate"),
            CudaDriver.Bind<HandleFn>("cuEventDestroy_v2"), CudaDriver.Bind<EventRecordFn>("cuEventRecord"),
            CudaDriver.Bind<StreamWaitEventFn>("cuStreamWaitEvent"), CudaDriver.Bind<ToHostFn>("cuMemcpyDtoHAsync_v2"),
            CudaDriver.Bind<ToDeviceFn>("cuMemcpyHtoDAsync_v2"), CudaDriver.Bind<HostAllocFn>("cuMemHostAlloc"),
            CudaDriver.Bind<HandleFn>("cuMemFreeHost"));
    });

    const uint NonBlocking = 1, DisableTiming = 2, Portable = 1;

    readonly Api _api;
    readonly IntPtr _stream;
    readonly IntPtr _forkEvent; // recorded and waited on at once, so one event serves every fork
    readonly List<IntPtr> _events = [];
    readonly List<IntPtr> _hostBuffers = [];
    bool _disposed;

    CopyStream(Api api, IntPtr stream, IntPtr forkEvent) { _api = api; _stream = stream; _forkEvent = forkEvent; }

    /// <summary>A copy stream on the current CUDA context (make one with a tensor operation first), or null with why not.</summary>
    public static CopyStream? TryCreate(out string? why)
    {
        why = null;
        if (!CudaStreams.Available) { why = "the loaded libtorch has no CUDA stream API"; return null; }
        if (Driver.Value is not { } api) { why = "libcuda.so.1 (the CUDA driver) was not found"; return null; }
        int rc = api.StreamCreate(out var stream, NonBlocking);
        if (rc != 0) { why = $"cuStreamCreate failed (CUDA error {rc}); is a CUDA context current?"; return null; }
        CudaDriver.Check(api.EventCreate(out var fork, DisableTiming), "cuEventCreate");
        return new CopyStream(api, stream, fork);
    }

    /// <summary>A new event (destroyed with this stream), for <see cref="Signal"/> and <see cref="Await"/>.</summary>
    public IntPtr NewEvent()
    {
        CudaDriver.Check(_api.EventCreate(out var ev, DisableTiming), "cuEventCreate");
        _events.Add(ev);
        return ev;
    }

    /// <summary>Copies queued from now on wait for everything queued so far on the current stream.</summary>
    public void WaitForCurrent()
    {
        CudaDriver.Check(_api.EventRecord(_forkEvent, CudaStreams.Current), "cuEventRecord");
        CudaDriver.Check(_api.StreamWaitEvent(_stream, _forkEvent, 0), "cuStreamWaitEvent");
    }

    /// <summary>Marks the copies queued so far with <paramref name="ev"/>.</summary>
    public void Signal(IntPtr ev) => CudaDriver.Check(_api.EventRecord(ev, _stream), "cuEventRecord");

    /// <summary>Work queued from now on on the current stream waits for the copies marked with <paramref name="ev"/>.</summary>
    public void Await(IntPtr ev) => CudaDriver.Check(_api.StreamWaitEvent(CudaStreams.Current, ev, 0), "cuStreamWaitEvent");

    /// <summary>Page-locked host memory (freed with this stream).</summary>
    public IntPtr AllocateHost(long bytes)
    {
        CudaDriver.Check(_api.HostAlloc(out var p, (nuint)bytes, Portable), $"cuMemHostAlloc of {bytes} bytes");
        _hostBuffers.Add(p);
        return p;
    }

    /// <summary>Queues a copy of a contiguous device tensor into page-locked host memory.</summary>
    public void ToHost(IntPtr host, Tensor source) =>
        CudaDriver.Check(_api.ToHost(host, FusedKernels.Pointer(source), Bytes(source), _stream), "cuMemcpyDtoHAsync");

    /// <summary>Queues a copy from page-locked host memory into a contiguous device tensor.</summary>
    public void ToDevice(Tensor target, IntPtr host) =>
        CudaDriver.Check(_api.ToDevice(FusedKernels.Pointer(target), host, Bytes(target), _stream), "cuMemcpyHtoDAsync");

    static nuint Bytes(Tensor t) => (nuint)(t.numel() * t.ElementSize);

    /// <summary>Synchronises the device first: queued copies may still use the buffers.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        cuda.synchronize();
        foreach (var p in _hostBuffers) _api.FreeHost(p);
        foreach (var e in _events) _api.EventDestroy(e);
        _api.EventDestroy(_forkEvent);
        _api.StreamDestroy(_stream);
    }
}
