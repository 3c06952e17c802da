using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.Runtime;

/// <summary>
/// Device and dtype selection. CUDA needs a CUDA build of libtorch: LoraKit uses the one inside an existing PyTorch
/// installation (see README, "GPU"). The <c>./lorakit</c> script arranges that when <c>LORAKIT_TORCH_LIB</c> is set or
/// <c>python3 -c 'import torch'</c> finds a CUDA-enabled torch.
/// </summary>
internal static class Devices
{
    public static Device Resolve(string name)
    {
        TorchBackend.EnsureLoaded(); // the first tensor-touching step of every load: a missing backend is one clear line
        CudaAllocatorConfig.Apply();
        switch (name.ToLowerInvariant())
        {
            case "cpu": return CPU;
            case "auto": return CudaAvailable() ? CUDA : CPU;
            case "cuda" or "gpu":
                if (!CudaAvailable())
                    throw new InvalidOperationException(
                        "CUDA was requested but is not available: the loaded libtorch has no CUDA support or no GPU is visible. " +
                        "Run through ./lorakit with LORAKIT_TORCH_LIB pointing at a CUDA PyTorch's torch/lib (or with python3's torch importable).");
                return CUDA;
            default:
                if (name.StartsWith("cuda:", StringComparison.OrdinalIgnoreCase) && CudaAvailable()) return new Device(name);
                throw new ArgumentException($"unknown device '{name}' (expected auto, cpu or cuda)");
        }
    }

    static bool CudaAvailable()
    {
        try { return cuda.is_available(); }
        catch (Exception) { return false; }
    }

    /// <summary>bf16 on GPUs, fp32 on CPU unless asked otherwise.</summary>
    public static ScalarType DefaultDType(Device d) => d.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
}
