using System.Runtime.InteropServices;

namespace LoraKit.Runtime.Cuda;

/// <summary>libcuda's driver API, bound by name at run time (TorchSharp exposes none of it).</summary>
internal static class CudaDriver
{
    static readonly Lazy<IntPtr> Library = new(() => NativeLibrary.TryLoad("libcuda.so.1", out var h) ? h : IntPtr.Zero);

    /// <summary>The entry point <paramref name="name"/> as a delegate, or null when libcuda or the symbol is missing.</summary>
    public static T? TryBind<T>(string name) where T : Delegate =>
        Library.Value != IntPtr.Zero && NativeLibrary.TryGetExport(Library.Value, name, out var f)
            ? Marshal.GetDelegateForFunctionPointer<T>(f) : null;

    public static T Bind<T>(string name) where T : Delegate =>
        TryBind<T>(name) ?? throw new InvalidOperationException($"libcuda.so.1 (the CUDA driver) has no {name}");

    public static void Check(int rc, string what)
    {
        if (rc != 0) throw new InvalidOperationException($"{what} failed (CUDA error {rc})");
    }
}
