using static TorchSharp.torch;

namespace LoraKit.Serving.Paged;

/// <summary>Decode attention through the NVRTC paged-attention kernel (Runtime.Cuda.PagedAttentionKernel) on CUDA devices.</summary>
internal sealed class CudaPagedDecode : IPagedDecode
{
    /// <summary>The kernel for <paramref name="device"/>, or null off CUDA or when it cannot be compiled here.</summary>
    public static IPagedDecode? TryCreate(Device device) => null; // wired when the kernel lands

    public void Decode(Tensor q, Tensor kCache, Tensor vCache, Tensor blockTables, Tensor seqLens, Tensor output, double scale, double softcap, int window) =>
        throw new NotSupportedException();
}
