namespace LoraKit.Runtime.Cuda;

/// <summary>The device's free and total memory (cuMemGetInfo), for sizing caches to what is left after the model loads.</summary>
internal static class CudaFreeMemory
{
    delegate int MemGetInfoFn(out ulong free, out ulong total);
    static readonly Lazy<MemGetInfoFn?> Fn = new(() => CudaDriver.TryBind<MemGetInfoFn>("cuMemGetInfo_v2"));

    /// <summary>(free, total) bytes of the current device, or null without the driver. libtorch has made the context current.</summary>
    public static (long Free, long Total)? Read()
    {
        if (Fn.Value is not { } f || f(out var free, out var total) != 0) return null;
        return ((long)free, (long)total);
    }
}
