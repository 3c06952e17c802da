using System.Runtime.InteropServices;

namespace LoraKit.Distributed;

/// <summary>
/// libnccl.so.2, found the way the CUDA libtorch is (PyTorch's CUDA wheel ships it as the sibling package
/// <c>nvidia/nccl/lib</c> of <c>torch/lib</c>) and bound by name at run time, in the P/Invoke style of
/// <c>Runtime/Cuda/CudaDriver</c>. Search order: <c>LORAKIT_NCCL_LIB</c> (a file), then next to each torch lib
/// directory (<c>LORAKIT_TORCH_LIB</c>, <c>LIBTORCH_DIR</c>, the directory libtorch_cuda.so was loaded from), then each
/// <c>LD_LIBRARY_PATH</c> entry, then the default loader. Missing: one <see cref="NcclMissingException"/> line saying
/// where it looked. NVLink multicast (NVLS) is switched off before NCCL reads its environment unless the user set it:
/// the shared machines here must keep it off.
/// </summary>
internal static class NcclLibrary
{
    const string Name = "libnccl.so.2";
    static readonly Lazy<(IntPtr handle, string where)> Loaded = new(Load);

    /// <summary>The loaded library's handle; throws <see cref="NcclMissingException"/> when there is none.</summary>
    public static IntPtr Handle => Loaded.Value.handle;

    /// <summary>The file it was loaded from (or the soname the default loader resolved).</summary>
    public static string Where => Loaded.Value.where;

    public static T Bind<T>(string name) where T : Delegate =>
        NativeLibrary.TryGetExport(Handle, name, out var f) ? Marshal.GetDelegateForFunctionPointer<T>(f)
            : throw new NcclMissingException($"{Where} has no {name} (NCCL 2.12 or newer is needed)");

    static (IntPtr, string) Load()
    {
        SetNativeDefault("NCCL_NVLS_ENABLE", "0");
        var tried = new List<string>();
        foreach (var file in Candidates())
        {
            if (tried.Contains(file)) continue;
            tried.Add(file);
            if (File.Exists(file) && NativeLibrary.TryLoad(file, out var h)) return (h, file);
        }
        if (NativeLibrary.TryLoad(Name, out var d)) return (d, Name);
        throw new NcclMissingException($"{Name} not found (looked in {string.Join(", ", tried.Select(Path.GetDirectoryName).Distinct())} and the default library path); " +
                                       "multi-GPU training needs PyTorch's CUDA wheel (its nvidia/nccl/lib) or LORAKIT_NCCL_LIB=/path/to/libnccl.so.2");
    }

    static IEnumerable<string> Candidates()
    {
        if (Environment.GetEnvironmentVariable("LORAKIT_NCCL_LIB") is { Length: > 0 } explicitFile) yield return Path.GetFullPath(explicitFile);
        var torchDirs = new List<string>();
        foreach (var env in new[] { "LORAKIT_TORCH_LIB", "LIBTORCH_DIR" })
            if (Environment.GetEnvironmentVariable(env) is { Length: > 0 } dir) torchDirs.Add(dir);
        if (LoadedFrom("libtorch_cuda.so") is string loaded) torchDirs.Add(loaded);
        var pathDirs = (Environment.GetEnvironmentVariable("LD_LIBRARY_PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries);
        foreach (var dir in torchDirs.Concat(pathDirs))
        {
            yield return Path.GetFullPath(Path.Combine(dir, "..", "..", "nvidia", "nccl", "lib", Name));
            yield return Path.GetFullPath(Path.Combine(dir, Name));
        }
    }

    /// <summary>The directory a shared library named <paramref name="file"/> was mapped from in this process, or null.</summary>
    static string? LoadedFrom(string file)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/maps"))
            {
                int slash = line.IndexOf('/');
                if (slash >= 0 && Path.GetFileName(line[slash..]) == file) return Path.GetDirectoryName(line[slash..]);
            }
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return null;
    }

    [DllImport("libc", EntryPoint = "setenv")] static extern int SetEnv(string name, string value, int overwrite);

    /// <summary>
    /// Sets <paramref name="name"/> in the native environment (which NCCL's getenv reads: .NET keeps its own copy on
    /// Linux, which native code does not see) and in .NET's, unless the user already set it.
    /// </summary>
    internal static void SetNativeDefault(string name, string value)
    {
        if (!string.IsNullOrEmpty(Environment.GetEnvironmentVariable(name))) return;
        Environment.SetEnvironmentVariable(name, value);
        if (OperatingSystem.IsLinux() || OperatingSystem.IsMacOS()) SetEnv(name, value, 0);
    }
}

/// <summary>libnccl.so.2 could not be found or lacks an entry point: one line saying where LoraKit looked.</summary>
public sealed class NcclMissingException(string message) : LoraKitException(message);
