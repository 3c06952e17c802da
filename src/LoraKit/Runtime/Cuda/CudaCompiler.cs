using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// Run-time compiled CUDA kernels next to libtorch's (TorchSharp cannot load custom ops): CUDA C++ source is compiled
/// by NVRTC (shipped with PyTorch) for the GPU at hand, loaded through the driver API and launched on libtorch's current
/// stream (<see cref="CudaStreams"/>), so ordering with its kernels needs no synchronisation and graph capture records them. Tensors are passed by
/// their device pointers. Everything is loaded lazily; when any piece is missing <see cref="TryLoad"/> returns null and
/// callers keep their TorchSharp path.
/// </summary>
internal sealed class CudaCompiler
{
    // ---- driver API (libcuda) and NVRTC entry points, bound at run time ----
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuInit(uint flags);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuDeviceGet(out int device, int ordinal);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuDeviceGetAttribute(out int value, int attribute, int device);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuPrimaryCtxRetain(out IntPtr ctx, int device);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuCtxGetCurrent(out IntPtr ctx);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuCtxSetCurrent(IntPtr ctx);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuCtxGetDevice(out int device);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuModuleLoadData(out IntPtr module, byte[] image);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int CuModuleGetFunction(out IntPtr function, IntPtr module, [MarshalAs(UnmanagedType.LPStr)] string name);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate int CuLaunchKernel(IntPtr f, uint gx, uint gy, uint gz, uint bx, uint by, uint bz, uint sharedBytes, IntPtr stream, IntPtr args, IntPtr extra);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate int NvrtcCreateProgram(out IntPtr prog, [MarshalAs(UnmanagedType.LPStr)] string src, [MarshalAs(UnmanagedType.LPStr)] string name, int headers, IntPtr h, IntPtr n);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate int NvrtcCompileProgram(IntPtr prog, int count, [MarshalAs(UnmanagedType.LPArray, ArraySubType = UnmanagedType.LPStr)] string[] options);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int NvrtcGetSize(IntPtr prog, out UIntPtr size);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int NvrtcGetBytes(IntPtr prog, byte[] buffer);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int NvrtcDestroyProgram(ref IntPtr prog);
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr TensorData(IntPtr tensor);

    readonly CuCtxGetCurrent _ctxGetCurrent;
    readonly CuCtxSetCurrent _ctxSetCurrent;
    readonly CuModuleGetFunction _getFunction;
    readonly CuLaunchKernel _launch;
    readonly TensorData _tensorData;
    readonly IntPtr _context;
    readonly IntPtr _module;
    readonly Dictionary<string, IntPtr> _functions = [];

    CudaCompiler(string source, IntPtr libcuda, IntPtr nvrtc, IntPtr torchSharp)
    {
        T Fn<T>(IntPtr lib, string name) where T : Delegate => Marshal.GetDelegateForFunctionPointer<T>(NativeLibrary.GetExport(lib, name));
        Check(Fn<CuInit>(libcuda, "cuInit")(0), "cuInit");
        // The device whose context is current (a data-parallel rank makes GPU LOCAL_RANK current first), else GPU 0.
        int ordinal = Fn<CuCtxGetCurrent>(libcuda, "cuCtxGetCurrent")(out var current) == 0 && current != IntPtr.Zero
                      && Fn<CuCtxGetDevice>(libcuda, "cuCtxGetDevice")(out int currentDevice) == 0 ? currentDevice : 0;
        Check(Fn<CuDeviceGet>(libcuda, "cuDeviceGet")(out int dev, ordinal), "cuDeviceGet");
        var attr = Fn<CuDeviceGetAttribute>(libcuda, "cuDeviceGetAttribute");
        Check(attr(out int major, 75, dev), "compute capability");
        Check(attr(out int minor, 76, dev), "compute capability");
        Check(Fn<CuPrimaryCtxRetain>(libcuda, "cuDevicePrimaryCtxRetain")(out _context, dev), "cuDevicePrimaryCtxRetain");
        _ctxGetCurrent = Fn<CuCtxGetCurrent>(libcuda, "cuCtxGetCurrent");
        _ctxSetCurrent = Fn<CuCtxSetCurrent>(libcuda, "cuCtxSetCurrent");
        _getFunction = Fn<CuModuleGetFunction>(libcuda, "cuModuleGetFunction");
        _launch = Fn<CuLaunchKernel>(libcuda, "cuLaunchKernel");
        _tensorData = Fn<TensorData>(torchSharp, "THSTensor_data");

        // NVRTC → CUBIN for this GPU.
        Check(Fn<NvrtcCreateProgram>(nvrtc, "nvrtcCreateProgram")(out var prog, source, "lorakit.cu", 0, IntPtr.Zero, IntPtr.Zero), "nvrtcCreateProgram");
        try
        {
            int rc = Fn<NvrtcCompileProgram>(nvrtc, "nvrtcCompileProgram")(prog, 2, [$"--gpu-architecture=sm_{major}{minor}", "--std=c++17"]);
            if (rc != 0)
            {
                Fn<NvrtcGetSize>(nvrtc, "nvrtcGetProgramLogSize")(prog, out var logSize);
                var log = new byte[(int)logSize];
                Fn<NvrtcGetBytes>(nvrtc, "nvrtcGetProgramLog")(prog, log);
                throw new InvalidOperationException("NVRTC: " + System.Text.Encoding.UTF8.GetString(log).TrimEnd('\0'));
            }
            Check(Fn<NvrtcGetSize>(nvrtc, "nvrtcGetCUBINSize")(prog, out var size), "nvrtcGetCUBINSize");
            var cubin = new byte[(int)size];
            Check(Fn<NvrtcGetBytes>(nvrtc, "nvrtcGetCUBIN")(prog, cubin), "nvrtcGetCUBIN");
            MakeCurrent();
            Check(Fn<CuModuleLoadData>(libcuda, "cuModuleLoadData")(out _module, cubin), "cuModuleLoadData");
        }
        finally { Fn<NvrtcDestroyProgram>(nvrtc, "nvrtcDestroyProgram")(ref prog); }
    }

    static void Check(int rc, string what)
    {
        if (rc != 0) throw new InvalidOperationException($"{what} failed (CUDA/NVRTC error {rc})");
    }

    /// <summary>Compiles <paramref name="source"/>, or returns null (with the reason) when CUDA, NVRTC or the compile is unavailable.</summary>
    public static CudaCompiler? TryLoad(string source, out string? why)
    {
        why = null;
        try
        {
            if (!NativeLibrary.TryLoad("libcuda.so.1", out var libcuda)) { why = "libcuda.so.1 not found"; return null; }
            if (FindNvrtc() is not IntPtr nvrtc) { why = "NVRTC (libnvrtc.so) not found next to PyTorch"; return null; }
            if (!NativeLibrary.TryLoad("LibTorchSharp", typeof(TorchSharp.torch).Assembly, null, out var torchSharp)
                && !NativeLibrary.TryLoad("libLibTorchSharp.so", typeof(TorchSharp.torch).Assembly, null, out torchSharp))
            { why = "LibTorchSharp not found"; return null; }
            return new CudaCompiler(source, libcuda, nvrtc, torchSharp);
        }
        catch (Exception e) when (e is InvalidOperationException or EntryPointNotFoundException or DllNotFoundException)
        {
            why = e.Message;
            return null;
        }
    }

    /// <summary>NVRTC: already loadable by name, or in PyTorch's pip CUDA packages (site-packages/nvidia/*/lib), or the toolkit.</summary>
    static IntPtr? FindNvrtc()
    {
        foreach (var name in new[] { "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so" })
            if (NativeLibrary.TryLoad(name, out var h)) return h;
        var roots = new List<string>();
        foreach (var env in new[] { "LORAKIT_TORCH_LIB", "LIBTORCH_DIR" })
            if (Environment.GetEnvironmentVariable(env) is { Length: > 0 } lib) roots.Add(Path.GetFullPath(Path.Combine(lib, "..", "..", "nvidia")));
        roots.Add("/usr/local/cuda/lib64");
        foreach (var root in roots.Where(Directory.Exists))
            foreach (var file in Directory.EnumerateFiles(root, "libnvrtc.so*", SearchOption.AllDirectories)
                         .Where(f => !f.Contains("builtins")).OrderByDescending(f => f))
                if (NativeLibrary.TryLoad(file, out var h)) return h;
        return null;
    }

    void MakeCurrent()
    {
        if (_ctxGetCurrent(out var ctx) != 0 || ctx == IntPtr.Zero) Check(_ctxSetCurrent(_context), "cuCtxSetCurrent");
    }

    /// <summary>The device address of a tensor's first element.</summary>
    public IntPtr Pointer(Tensor t) => _tensorData(t.Handle);

    /// <summary>Launches a kernel of the module on libtorch's current stream. Arguments: tensors (passed as pointers), pointers, int, long, float.</summary>
    public void Launch(string kernel, long blocks, int threads, params object[] args)
    {
        MakeCurrent();
        if (!_functions.TryGetValue(kernel, out var fn))
        {
            Check(_getFunction(out fn, _module, kernel), $"cuModuleGetFunction({kernel})");
            _functions[kernel] = fn;
        }
        // One block: the argument values (8 bytes each), then the array of pointers to them that cuLaunchKernel reads.
        int n = args.Length;
        var block = Marshal.AllocHGlobal(16 * n);
        try
        {
            for (int i = 0; i < n; i++)
            {
                var value = block + 8 * i;
                switch (args[i])
                {
                    case Tensor t: Marshal.WriteIntPtr(value, Pointer(t)); break;
                    case IntPtr p: Marshal.WriteIntPtr(value, p); break;
                    case int v: Marshal.WriteInt32(value, v); break;
                    case long v: Marshal.WriteInt64(value, v); break;
                    case float v: Marshal.WriteInt32(value, BitConverter.SingleToInt32Bits(v)); break;
                    default: throw new ArgumentException($"unsupported kernel argument {args[i]?.GetType().Name}");
                }
                Marshal.WriteIntPtr(block + 8 * n + IntPtr.Size * i, value);
            }
            Check(_launch(fn, (uint)blocks, 1, 1, (uint)threads, 1, 1, 0, CudaStreams.Current, block + 8 * n, IntPtr.Zero), $"launch {kernel}");
        }
        finally { Marshal.FreeHGlobal(block); }
    }
}
