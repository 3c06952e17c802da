namespace LoraKit.Runtime;

/// <summary>
/// No TorchSharp native backend could be loaded: the application references the LoraKit package but neither
/// <c>TorchSharp-cpu</c> nor a CUDA libtorch package. The message says which package to add; the inner exception is
/// TorchSharp's own (with its load trace).
/// </summary>
public sealed class TorchBackendMissingException(Exception inner) : LoraKitException(
    "no TorchSharp native backend could be loaded: add the package TorchSharp-cpu to your application " +
    "(dotnet add package TorchSharp-cpu), or a CUDA libtorch package (libtorch-cuda-12.8-linux-x64 or -win-x64) with " +
    "TorchSharp, or put PyTorch's torch/lib on the library path; LoraKit depends on the managed TorchSharp package only " +
    $"({FirstLine(inner)})", inner)
{
    static string FirstLine(Exception e)
    {
        var root = e is TypeInitializationException { InnerException: { } i } ? i : e;
        var line = root.Message.Split('\n', 2)[0].Trim();
        return line.Length <= 200 ? line : line[..200] + "…";
    }
}
