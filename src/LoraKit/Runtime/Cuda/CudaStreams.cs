using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// libtorch's current CUDA stream, read and set from C# (TorchSharp has no stream API). LoraKit's own kernels launch on
/// it, so they stay ordered with libtorch's, and a CUDA graph captures it (capture needs a stream other than the legacy
/// default one). Reading uses libtorch's stable C shim (<c>aoti_torch_get_current_cuda_stream</c>); setting uses c10's
/// <c>getStreamFromExternal</c> and <c>setCurrentCUDAStream</c>, whose C++ names are bound by their mangled form (the shim's
/// setter is not exported by PyTorch's wheels). <c>c10::cuda::CUDAStream</c> is a trivially copyable 16-byte value
/// (device type and index, then the stream id), passed and returned in registers like <see cref="C10Stream"/>.
/// </summary>
internal static class CudaStreams
{
    delegate int GetCurrentFn(int device, out IntPtr stream);
    delegate C10Stream FromExternalFn(IntPtr stream, sbyte device);
    delegate void SetCurrentFn(C10Stream stream);
    delegate int StreamCreateFn(out IntPtr stream, uint flags);
    delegate int CtxGetCurrentFn(out IntPtr ctx);

    [StructLayout(LayoutKind.Sequential)]
    struct C10Stream { public long Device; public long Id; }

    static readonly (GetCurrentFn? get, FromExternalFn? wrap, SetCurrentFn? set) Torch = LoadTorch();

    static (GetCurrentFn?, FromExternalFn?, SetCurrentFn?) LoadTorch()
    {
        GetCurrentFn? get = null;
        foreach (var name in new[] { "libtorch_cuda.so", "libtorch.so" })
            if (NativeLibrary.TryLoad(name, out var lib) && NativeLibrary.TryGetExport(lib, "aoti_torch_get_current_cuda_stream", out var g))
            {
                get = Marshal.GetDelegateForFunctionPointer<GetCurrentFn>(g);
                break;
            }
        if (get is null || !NativeLibrary.TryLoad("libc10_cuda.so", out var c10)
            || !NativeLibrary.TryGetExport(c10, "_ZN3c104cuda21getStreamFromExternalEP11CUstream_sta", out var wrap)
            || !NativeLibrary.TryGetExport(c10, "_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE", out var set))
            return (get, null, null);
        return (get, Marshal.GetDelegateForFunctionPointer<FromExternalFn>(wrap), Marshal.GetDelegateForFunctionPointer<SetCurrentFn>(set));
    }

    /// <summary>Whether the loaded libtorch lets us read and set its current stream (CUDA builds do).</summary>
    public static bool Available => Torch.set != null;

    /// <summary>The calling thread's current stream on the current device (IntPtr.Zero: the legacy default stream, or no CUDA libtorch).</summary>
    public static IntPtr Current => Torch.get is { } get && get(-1, out var s) == 0 ? s : IntPtr.Zero;

    /// <summary>
    /// Makes a new non-blocking stream libtorch's current one on the calling thread until the returned scope ends
    /// (synchronising the device at both ends, so work on the old stream and the new one stays ordered). The autograd
    /// engine runs each backward node on its forward's stream, so backward follows.
    /// </summary>
    public static IDisposable UseSideStream(Device device)
    {
        if (!Available) throw new InvalidOperationException("the loaded libtorch exports no stream API (aoti_torch_get_current_cuda_stream, c10::cuda::setCurrentCUDAStream): CUDA graphs need a CUDA build of libtorch 2.4 or newer");
        cuda.synchronize(device);
        var previous = Current;
        if (CudaDriver.Bind<CtxGetCurrentFn>("cuCtxGetCurrent")(out var ctx) != 0 || ctx == IntPtr.Zero)
            throw new InvalidOperationException("no CUDA context is current on this thread (run a tensor operation on the GPU first)");
        const uint NonBlocking = 1; // no implicit ordering with the legacy stream, which capture would reject
        CudaDriver.Check(CudaDriver.Bind<StreamCreateFn>("cuStreamCreate")(out var stream, NonBlocking), "cuStreamCreate");
        Set(stream, device);
        return new Scope(() =>
        {
            cuda.synchronize(device);
            Set(previous, device);
        });
    }

    static void Set(IntPtr stream, Device device)
    {
        var index = (sbyte)Math.Max(0, (int)device.index);
        Torch.set!(Torch.wrap!(stream, index));
        if (Current != stream) throw new InvalidOperationException("setting libtorch's current CUDA stream had no effect (c10 ABI changed?)");
    }

    sealed class Scope(Action end) : IDisposable
    {
        Action? _end = end;
        public void Dispose() { _end?.Invoke(); _end = null; }
    }
}
