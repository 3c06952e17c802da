using TorchSharp;

namespace LoraKit.Runtime;

/// <summary>
/// The native half of TorchSharp, loaded once before LoraKit first touches a tensor. The LoraKit package depends on
/// the managed <c>TorchSharp</c> package only, so the application chooses the backend (<c>TorchSharp-cpu</c>, or a
/// CUDA libtorch package, or PyTorch's own libtorch on the library path). When none is there, TorchSharp's static
/// initialiser fails with a multi-page trace (as a <see cref="TypeInitializationException"/>, or a
/// <see cref="NotSupportedException"/> / <see cref="DllNotFoundException"/> underneath); this turns it into one
/// <see cref="TorchBackendMissingException"/> naming the package to add. The outcome is remembered: a type whose
/// static initialiser failed stays failed for the life of the process.
/// </summary>
public static class TorchBackend
{
    static readonly Lazy<Exception?> LoadFailure = new(Load);

    /// <summary>Loads the native backend if it is not loaded yet; throws <see cref="TorchBackendMissingException"/> when none can be.</summary>
    public static void EnsureLoaded()
    {
        if (LoadFailure.Value is { } failure) throw new TorchBackendMissingException(failure);
    }

    static Exception? Load()
    {
        try
        {
            // Touching torch runs its static initialiser, which loads LibTorchSharp and libtorch (CPU part).
            torch.InitializeDeviceType(DeviceType.CPU);
            return null;
        }
        catch (Exception e) when (IsMissingBackend(e))
        {
            return e;
        }
    }

    static bool IsMissingBackend(Exception e) => e switch
    {
        TypeInitializationException t => t.InnerException is null || IsMissingBackend(t.InnerException),
        NotSupportedException or DllNotFoundException or BadImageFormatException or EntryPointNotFoundException => true,
        _ => false,
    };
}
