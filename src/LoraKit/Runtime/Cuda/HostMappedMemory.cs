using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// A CPU tensor's memory page-locked and mapped into the GPU's address space (<c>cuMemHostRegister</c> with
/// DEVICEMAP), so kernels read it over PCIe without a copy. The caller keeps the tensor alive until this is disposed.
/// Used for frozen tables of which a step reads only a few rows (the untied input embedding: 1 GiB on Llama-3-8B, of
/// which a step reads [tokens, hidden]).
/// </summary>
internal sealed class HostMappedMemory : IDisposable
{
    delegate int Register(IntPtr p, nuint bytes, uint flags);
    delegate int DevicePointer(out IntPtr device, IntPtr p, uint flags);
    delegate int Unregister(IntPtr p);

    const uint Portable = 0x1, DeviceMap = 0x2;

    static readonly Lazy<(Register, DevicePointer, Unregister)?> Driver = new(() =>
        CudaDriver.TryBind<Register>("cuMemHostRegister_v2") is { } r && CudaDriver.TryBind<DevicePointer>("cuMemHostGetDevicePointer_v2") is { } d
            && CudaDriver.TryBind<Unregister>("cuMemHostUnregister") is { } u ? (r, d, u) : null);

    readonly IntPtr _host;
    bool _disposed;

    /// <summary>The address kernels read the tensor at.</summary>
    public IntPtr Device { get; }

    HostMappedMemory(IntPtr host, IntPtr device) { _host = host; Device = device; }

    /// <summary>Maps a contiguous CPU tensor (libtorch's CUDA context must be current: call after the first CUDA op),
    /// or returns null with the driver's reason.</summary>
    public static HostMappedMemory? TryMap(Tensor cpuTensor, IntPtr hostPointer, out string? why)
    {
        why = null;
        if (cpuTensor.device_type != TorchSharp.DeviceType.CPU || !cpuTensor.is_contiguous()) { why = "not a contiguous CPU tensor"; return null; }
        if (Driver.Value is not { } driver) { why = "libcuda.so.1 has no cuMemHostRegister_v2"; return null; }
        var (register, devicePointer, unregister) = driver;
        var bytes = (nuint)(cpuTensor.numel() * cpuTensor.ElementSize);
        int rc = register(hostPointer, bytes, Portable | DeviceMap);
        if (rc != 0) { why = $"cuMemHostRegister failed (CUDA error {rc})"; return null; }
        rc = devicePointer(out var device, hostPointer, 0);
        if (rc != 0) { unregister(hostPointer); why = $"cuMemHostGetDevicePointer failed (CUDA error {rc})"; return null; }
        return new HostMappedMemory(hostPointer, device);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Driver.Value?.Item3(_host);
    }
}
