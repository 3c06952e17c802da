using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoraKit.Distributed;

/// <summary>
/// One NCCL communicator over P/Invoke (<see cref="NcclLibrary"/>): the unique id rank 0 makes, the collective init,
/// an in-place sum all-reduce enqueued on libtorch's current CUDA stream (so it is ordered after the backward that
/// produced the gradients and before the optimizer that reads them, with no host synchronisation), and abort/destroy.
/// The caller makes the rank's device current first (<see cref="CudaDevice.MakeCurrent"/>): NCCL binds the
/// communicator to the current device.
/// </summary>
public sealed unsafe class NcclComm : IDisposable
{
    /// <summary>ncclUniqueId: 128 opaque bytes, passed by value to ncclCommInitRank.</summary>
    [StructLayout(LayoutKind.Sequential)]
    struct UniqueId { public fixed byte Internal[IdBytes]; }

    /// <summary>The size of an NCCL unique id.</summary>
    public const int IdBytes = 128;

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int GetUniqueIdFn(out UniqueId id);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CommInitRankFn(out IntPtr comm, int nranks, UniqueId id, int rank);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int AllReduceFn(IntPtr send, IntPtr recv, UIntPtr count, int dtype, int op, IntPtr comm, IntPtr stream);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CommFn(IntPtr comm);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int AsyncErrorFn(IntPtr comm, out int result);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr ErrorStringFn(int result);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int VersionFn(out int version);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr TensorDataFn(IntPtr tensor);

    const int SumOp = 0; // ncclSum
    IntPtr _comm;
    int _aborted;

    NcclComm(IntPtr comm) => _comm = comm;

    /// <summary>The loaded NCCL's version code (e.g. 22703 for 2.27.3).</summary>
    public static int Version
    {
        get { Check(NcclLibrary.Bind<VersionFn>("ncclGetVersion")(out int v), "ncclGetVersion"); return v; }
    }

    /// <summary>A fresh unique id (rank 0 makes it and shares it through the store).</summary>
    public static byte[] NewUniqueId()
    {
        Check(NcclLibrary.Bind<GetUniqueIdFn>("ncclGetUniqueId")(out var id), "ncclGetUniqueId");
        var bytes = new byte[IdBytes];
        for (int i = 0; i < IdBytes; i++) bytes[i] = id.Internal[i];
        return bytes;
    }

    /// <summary>Joins the communicator of <paramref name="worldSize"/> ranks named by <paramref name="uniqueId"/> (blocks until every rank has joined).</summary>
    public static NcclComm Init(int worldSize, byte[] uniqueId, int rank)
    {
        if (uniqueId.Length != IdBytes) throw new ArgumentException($"an NCCL unique id has {IdBytes} bytes, not {uniqueId.Length}");
        var id = new UniqueId();
        for (int i = 0; i < IdBytes; i++) id.Internal[i] = uniqueId[i];
        Check(NcclLibrary.Bind<CommInitRankFn>("ncclCommInitRank")(out var comm, worldSize, id, rank), $"ncclCommInitRank (rank {rank} of {worldSize})");
        return new NcclComm(comm);
    }

    /// <summary>Sums <paramref name="t"/> (contiguous, on this rank's GPU; fp32, bf16, fp16, fp64 or int64) over the ranks, in place, on the current stream.</summary>
    public void AllReduceSum(Tensor t)
    {
        if (t.device.type != TorchSharp.DeviceType.CUDA) throw new ArgumentException("NCCL all-reduces CUDA tensors");
        if (!t.is_contiguous()) throw new ArgumentException("NCCL all-reduces contiguous tensors");
        int dtype = t.dtype switch
        {
            ScalarType.Float32 => 7, ScalarType.Float64 => 8, ScalarType.BFloat16 => 9, ScalarType.Float16 => 6,
            ScalarType.Int64 => 4, ScalarType.Int32 => 2,
            _ => throw new ArgumentException($"NCCL all-reduce of {t.dtype} is not supported here"),
        };
        var ptr = TensorData.Value(t.Handle);
        var stream = Runtime.Cuda.CudaStreams.Current;
        Check(AllReduce.Value(ptr, ptr, (UIntPtr)(ulong)t.numel(), dtype, SumOp, Live(), stream), "ncclAllReduce");
    }

    /// <summary>The communicator's asynchronous error (a peer gone, a network failure), or null while it is healthy.</summary>
    public string? AsyncError()
    {
        var c = _comm;
        if (c == IntPtr.Zero || Volatile.Read(ref _aborted) != 0) return null;
        int rc = AsyncErrorQuery.Value(c, out int result);
        if (rc != 0) return Describe(rc);
        return result is 0 or 7 ? null : Describe(result); // 7: ncclInProgress (a non-blocking operation still running)
    }

    /// <summary>Aborts the communicator: pending and future collectives fail instead of waiting for a peer that will not come. Safe from another thread.</summary>
    public void Abort()
    {
        if (Interlocked.Exchange(ref _aborted, 1) != 0 || _comm == IntPtr.Zero) return;
        NcclLibrary.Bind<CommFn>("ncclCommAbort")(_comm);
    }

    /// <summary>Destroys the communicator (after its work completed); an aborted one is already gone.</summary>
    public void Dispose()
    {
        var c = Interlocked.Exchange(ref _comm, IntPtr.Zero);
        if (c != IntPtr.Zero && Volatile.Read(ref _aborted) == 0) NcclLibrary.Bind<CommFn>("ncclCommDestroy")(c);
    }

    IntPtr Live() => _comm != IntPtr.Zero && Volatile.Read(ref _aborted) == 0 ? _comm : throw new InvalidOperationException("the NCCL communicator was aborted or destroyed");

    static readonly Lazy<AllReduceFn> AllReduce = new(() => NcclLibrary.Bind<AllReduceFn>("ncclAllReduce"));
    static readonly Lazy<AsyncErrorFn> AsyncErrorQuery = new(() => NcclLibrary.Bind<AsyncErrorFn>("ncclCommGetAsyncError"));
    static readonly Lazy<TensorDataFn> TensorData = new(() =>
    {
        if (!NativeLibrary.TryLoad("LibTorchSharp", typeof(TorchSharp.torch).Assembly, null, out var lib)
            && !NativeLibrary.TryLoad("libLibTorchSharp.so", typeof(TorchSharp.torch).Assembly, null, out lib))
            throw new InvalidOperationException("LibTorchSharp not found");
        return Marshal.GetDelegateForFunctionPointer<TensorDataFn>(NativeLibrary.GetExport(lib, "THSTensor_data"));
    });

    static string Describe(int rc) =>
        Marshal.PtrToStringAnsi(NcclLibrary.Bind<ErrorStringFn>("ncclGetErrorString")(rc)) ?? $"NCCL error {rc}";

    static void Check(int rc, string what)
    {
        if (rc != 0) throw new NcclException($"{what} failed: {Describe(rc)} (NCCL_DEBUG=WARN says more)");
    }
}

/// <summary>An NCCL call failed: one line with NCCL's own description.</summary>
public sealed class NcclException(string message) : LoraKitException(message);
