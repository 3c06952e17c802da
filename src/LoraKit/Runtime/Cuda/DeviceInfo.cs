using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// What a run records about where it ran: the device ("cpu", "cuda:0"), the GPU's name when the CUDA driver tells it
/// (libcuda's <c>cuDeviceGetName</c>; TorchSharp exposes no device properties), and peak memory — on CUDA the caching
/// allocator's peak allocated bytes (<c>torch.cuda.max_memory_allocated</c>), on CPU the process's peak working set
/// (VmHWM), labelled by <see cref="PeakMemory"/>'s kind because the two measure different things. Never throws: what
/// cannot be read is null.
/// </summary>
internal static class DeviceInfo
{
    /// <summary>The kind of a CUDA peak: libtorch's allocator, since the process started (model load included).</summary>
    public const string CudaMaxAllocated = "cuda_max_allocated";
    /// <summary>The kind of a CPU peak: the whole process's resident memory high-water mark.</summary>
    public const string ProcessPeakWorkingSet = "process_peak_working_set";

    /// <summary>A dtype as the CLI's --dtype spells it: fp32, bf16, fp16 (others by their safetensors name).</summary>
    public static string DTypeName(ScalarType t) => t switch
    {
        ScalarType.Float32 => "fp32", ScalarType.BFloat16 => "bf16", ScalarType.Float16 => "fp16",
        _ => IO.DTypes.ToName(t).ToLowerInvariant(),
    };

    /// <summary>"cpu" or "cuda:N" (index 0 when the device names none).</summary>
    public static string Name(Device device) =>
        device.type == TorchSharp.DeviceType.CUDA ? $"cuda:{Math.Max(device.index, 0)}" : device.type.ToString().ToLowerInvariant();

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int InitFn(uint flags);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int DeviceGetFn(out int device, int ordinal);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int DeviceGetNameFn(byte[] name, int len, int device);

    /// <summary>The GPU's marketing name ("NVIDIA H200"), or null on CPU or when the driver cannot be asked.</summary>
    public static string? GpuName(Device device)
    {
        if (device.type != TorchSharp.DeviceType.CUDA) return null;
        try
        {
            var init = CudaDriver.TryBind<InitFn>("cuInit");
            var get = CudaDriver.TryBind<DeviceGetFn>("cuDeviceGet");
            var getName = CudaDriver.TryBind<DeviceGetNameFn>("cuDeviceGetName");
            if (init is null || get is null || getName is null || init(0) != 0 || get(out int dev, Math.Max(device.index, 0)) != 0) return null;
            var buffer = new byte[256];
            if (getName(buffer, buffer.Length, dev) != 0) return null;
            int end = Array.IndexOf(buffer, (byte)0);
            return Encoding.ASCII.GetString(buffer, 0, end < 0 ? buffer.Length : end).Trim() is { Length: > 0 } s ? s : null;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or MarshalDirectiveException) { return null; }
    }

    /// <summary>Peak memory in GiB and its kind (<see cref="CudaMaxAllocated"/> or <see cref="ProcessPeakWorkingSet"/>), or null.</summary>
    public static (double Gib, string Kind)? PeakMemory(Device device)
    {
        if (device.type == TorchSharp.DeviceType.CUDA)
            return CudaMemoryStats.Read(device) is { } m ? (CudaMemory.Gib(m.PeakAllocated), CudaMaxAllocated) : null;
        try
        {
            using var self = Process.GetCurrentProcess();
            return self.PeakWorkingSet64 > 0 ? (self.PeakWorkingSet64 / (double)(1L << 30), ProcessPeakWorkingSet) : null;
        }
        catch (Exception e) when (e is InvalidOperationException or PlatformNotSupportedException) { return null; }
    }
}
