using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>Bytes held by libtorch's CUDA caching allocator on one device, as <c>torch.cuda.memory_stats</c> reports them.</summary>
internal readonly record struct CudaMemory(long Allocated, long PeakAllocated, long Reserved, long PeakReserved)
{
    public static double Gib(long bytes) => bytes / (double)(1L << 30);
}

/// <summary>
/// Reads libtorch's CUDA allocator statistics (<c>torch.cuda.max_memory_allocated</c> and friends), which TorchSharp
/// does not expose. The allocator is <c>c10::cuda::CUDACachingAllocator::allocator</c> (an exported
/// <c>std::atomic&lt;CUDAAllocator*&gt;</c>); <c>getDeviceStats</c> and <c>resetPeakStats</c> are virtual and the native
/// allocator's class exports nothing, so their vtable slots are found at run time: they are the slots where the
/// vtable of <c>CUDAPluggableAllocator</c>, another <c>CUDAAllocator</c> that libtorch_cuda exports, holds its own
/// exported overrides (the base class fixes the slot for every subclass).
/// <para>
/// ABI (x86-64 SysV): <c>DeviceStats</c> is returned through a hidden first pointer; it is trivially copyable arrays of
/// <c>Stat {current, peak, allocated, freed}</c> (int64), one per pool (aggregate, small, large), in the order of
/// c10/core/CachingDeviceAllocator.h: allocation, segment, active, inactive_split, allocated_bytes, reserved_bytes, ….
/// The first read checks that layout against a fresh 4 MiB allocation and turns the reader off if it does not hold.
/// </para>
/// </summary>
internal static unsafe class CudaMemoryStats
{
    const int StatBytes = 32, ArrayBytes = 3 * StatBytes;
    const int AllocatedOffset = 4 * ArrayBytes, ReservedOffset = 5 * ArrayBytes;
    const int StatsBufferBytes = 4096; // DeviceStats is 976 bytes in PyTorch 2.11; room for growth at the end

    static readonly IntPtr AllocatorSlot; // &allocator (the atomic pointer)
    static readonly int GetStatsIndex = -1, ResetPeakIndex = -1;
    static bool? _layoutHolds;

    static CudaMemoryStats()
    {
        if (!NativeLibrary.TryLoad("libc10_cuda.so", out var c10)
            || !NativeLibrary.TryGetExport(c10, "_ZN3c104cuda20CUDACachingAllocator9allocatorE", out AllocatorSlot)
            || !NativeLibrary.TryLoad("libtorch_cuda.so", out var tc))
            return;
        const string Pluggable = "N5torch4cuda22CUDAPluggableAllocator22CUDAPluggableAllocator";
        if (!NativeLibrary.TryGetExport(tc, "_ZTV" + Pluggable + "E", out var vtable)
            || !NativeLibrary.TryGetExport(tc, "_Z" + Pluggable + "14getDeviceStatsEa", out var getStats)
            || !NativeLibrary.TryGetExport(tc, "_Z" + Pluggable + "14resetPeakStatsEa", out var resetPeak))
            return;
        // A vtable symbol points at offset-to-top and the type info; the function pointers follow.
        var slots = (IntPtr*)(vtable + 2 * IntPtr.Size);
        for (int i = 0; i < 256 && (GetStatsIndex < 0 || ResetPeakIndex < 0); i++)
        {
            if (slots[i] == getStats) GetStatsIndex = i;
            if (slots[i] == resetPeak) ResetPeakIndex = i;
        }
    }

    /// <summary>Whether the loaded libtorch is a CUDA build whose allocator statistics can be read.</summary>
    public static bool Available => AllocatorSlot != IntPtr.Zero && GetStatsIndex >= 0 && ResetPeakIndex >= 0 && Allocator != IntPtr.Zero;

    static IntPtr Allocator => AllocatorSlot == IntPtr.Zero ? IntPtr.Zero : *(IntPtr*)AllocatorSlot;

    static IntPtr Method(int index) => (*(IntPtr**)Allocator)[index];

    /// <summary>The device's allocator statistics, or null when they cannot be read (a CPU build, another allocator).</summary>
    public static CudaMemory? Read(Device device)
    {
        if (!Available || device.type != TorchSharp.DeviceType.CUDA) return null;
        _layoutHolds ??= LayoutHolds(device);
        return _layoutHolds == true ? ReadRaw(Index(device)) : null;
    }

    /// <summary>Starts the peaks again from the current values (torch.cuda.reset_peak_memory_stats).</summary>
    public static void ResetPeak(Device device)
    {
        if (Read(device) is null) return;
        ((delegate* unmanaged<IntPtr, sbyte, void>)Method(ResetPeakIndex))(Allocator, Index(device));
    }

    static sbyte Index(Device device) => (sbyte)Math.Max(device.index, 0);

    static CudaMemory ReadRaw(sbyte device)
    {
        var buffer = stackalloc byte[StatsBufferBytes];
        ((delegate* unmanaged<byte*, IntPtr, sbyte, byte*>)Method(GetStatsIndex))(buffer, Allocator, device);
        long At(int offset) => *(long*)(buffer + offset);
        // Stat: current at +0, peak at +8; the aggregate pool is each array's first Stat.
        return new CudaMemory(At(AllocatedOffset), At(AllocatedOffset + 8), At(ReservedOffset), At(ReservedOffset + 8));
    }

    /// <summary>A 4 MiB tensor must add exactly 4 MiB to the allocated bytes, and reserved must cover allocated.</summary>
    static bool LayoutHolds(Device device)
    {
        const long Bytes = 4L << 20;
        cuda.synchronize(device);
        var before = ReadRaw(Index(device));
        using (var probe = empty(Bytes, ScalarType.Byte, device))
        {
            var during = ReadRaw(Index(device));
            bool ok = during.Allocated - before.Allocated == Bytes && during.Reserved >= during.Allocated
                && during.PeakAllocated >= during.Allocated && during.PeakReserved >= during.Reserved && before.Allocated >= 0;
            if (!ok) Console.Error.WriteLine("warning: libtorch's CUDA allocator statistics do not have the expected layout; memory is not reported");
            return ok;
        }
    }
}
