using LoraKit.Models;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Serving.Paged;

/// <summary>Decode attention through the NVRTC paged-attention kernel (<see cref="PagedAttentionKernel"/>) on CUDA devices.</summary>
internal sealed class CudaPagedDecode : IPagedDecode
{
    CudaPagedDecode() { }

    /// <summary>
    /// The kernel for this model's attention shape, compiled now (never inside a graph capture), or null off CUDA or when
    /// it cannot be compiled here (the engine then keeps the libtorch gather path, with a note saying why).
    /// </summary>
    public static IPagedDecode? TryCreate(ModelConfig c, ScalarType dtype, Device device)
    {
        if (device.type != TorchSharp.DeviceType.CUDA || !FusedKernels.Enabled) return null;
        try
        {
            if (PagedAttentionKernel.Prepare(dtype, c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim, out var why)) return new CudaPagedDecode();
            Console.Error.WriteLine($"note: paged-attention kernel unavailable ({why}); decode attention gathers with TorchSharp ops");
        }
        catch (ArgumentException e) { Console.Error.WriteLine($"note: {e.Message}; decode attention gathers with TorchSharp ops"); }
        return null;
    }

    public void Decode(Tensor q, Tensor kCache, Tensor vCache, Tensor blockTables, Tensor seqLens, Tensor output, double scale, double softcap, int window) =>
        PagedAttentionKernel.Decode(q, kCache, vCache, blockTables, seqLens, output, scale, softcap, window);
}
