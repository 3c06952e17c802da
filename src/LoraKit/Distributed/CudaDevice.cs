using LoraKit.Runtime.Cuda;

namespace LoraKit.Distributed;

/// <summary>
/// Makes GPU <c>LOCAL_RANK</c> this process's current device before anything touches CUDA. TorchSharp has no
/// set_device; making the device's primary context current through the driver API does the same for everyone who asks
/// for "the current device" afterwards: the CUDA runtime (and so libtorch's <c>cuda</c> without an index, NCCL's
/// communicator), and LoraKit's own kernels, which load into the current context.
/// </summary>
public static class CudaDevice
{
    delegate int InitFn(uint flags);
    delegate int DeviceGetFn(out int device, int ordinal);
    delegate int DeviceCountFn(out int count);
    delegate int PrimaryCtxRetainFn(out IntPtr ctx, int device);
    delegate int CtxSetCurrentFn(IntPtr ctx);

    /// <summary>CUDA devices the driver sees (honouring CUDA_VISIBLE_DEVICES); 0 without a driver.</summary>
    public static int Count()
    {
        if (CudaDriver.TryBind<InitFn>("cuInit") is not { } init || init(0) != 0) return 0;
        return CudaDriver.Bind<DeviceCountFn>("cuDeviceGetCount")(out int n) == 0 ? n : 0;
    }

    /// <summary>Makes device <paramref name="ordinal"/>'s primary context current on the calling thread (the one that trains).</summary>
    public static void MakeCurrent(int ordinal)
    {
        int visible = Count();
        if (ordinal >= visible) throw new DistributedEnvException($"LOCAL_RANK={ordinal}: only {visible} CUDA device(s) are visible to this process");
        CudaDriver.Check(CudaDriver.Bind<DeviceGetFn>("cuDeviceGet")(out int dev, ordinal), "cuDeviceGet");
        CudaDriver.Check(CudaDriver.Bind<PrimaryCtxRetainFn>("cuDevicePrimaryCtxRetain")(out var ctx, dev), "cuDevicePrimaryCtxRetain");
        CudaDriver.Check(CudaDriver.Bind<CtxSetCurrentFn>("cuCtxSetCurrent")(ctx), "cuCtxSetCurrent");
    }
}
