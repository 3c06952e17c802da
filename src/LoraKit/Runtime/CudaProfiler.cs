using System.Runtime.InteropServices;

namespace LoraKit.Runtime;

/// <summary>
/// cudaProfilerStart/Stop from the CUDA runtime libtorch already loaded, so an external profiler (ncu/nsys with
/// "profile from start" off) records only the marked range. Does nothing when no CUDA runtime is loaded.
/// </summary>
internal static class CudaProfiler
{
    delegate int Call();
    static readonly (Call? start, Call? stop) Fns = Load();

    static (Call?, Call?) Load()
    {
        foreach (var name in new[] { "libcudart.so.13", "libcudart.so.12", "libcudart.so" })
            if (NativeLibrary.TryLoad(name, out var lib)
                && NativeLibrary.TryGetExport(lib, "cudaProfilerStart", out var start)
                && NativeLibrary.TryGetExport(lib, "cudaProfilerStop", out var stop))
                return (Marshal.GetDelegateForFunctionPointer<Call>(start), Marshal.GetDelegateForFunctionPointer<Call>(stop));
        return (null, null);
    }

    public static bool Available => Fns.start != null;
    public static void Start() => Fns.start?.Invoke();
    public static void Stop() => Fns.stop?.Invoke();
}
