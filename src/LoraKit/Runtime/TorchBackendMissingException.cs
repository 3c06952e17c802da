namespace LoraKit.Runtime;

/// <summary>
/// No TorchSharp native backend could be loaded: the application references the LoraKit package but neither
/// <c>TorchSharp-cpu</c> nor a CUDA libtorch package. The message says which package to add; the inner exception is
/// TorchSharp's own (with its load trace).
/// </summary>
public sealed class TorchBackendMissingException(Exception inner) : LoraKitException(
    "no TorchSharp native backend could be loaded: add the package TorchSharp-cpu to your application " +
    "(dotnet add package TorchSharp-cpu), or a CUDA libtorch package (libtorch-cuda-12.8-linux-x64 or -win-x64), or put " +
    "PyTorch's torch/lib on the library path; the LoraKit package depends on the managed TorchSharp package only", inner);
