using LoraKit.Models;
using LoraKit.Runtime.Cuda;
using TorchSharp;
using Parameter = TorchSharp.Modules.Parameter;
using static TorchSharp.torch;

namespace LoraKit.Accelerated;

/// <summary>
/// An <see cref="Embedding"/> whose frozen table lives in page-locked host memory mapped for the GPU, freeing its device
/// memory (1 GiB on Llama-3-8B); each forward reads only the rows of its tokens over PCIe (32 MiB for 4,096 tokens of a
/// 4,096-wide model) with one kernel, which CUDA graphs capture like any other. For untied tables: a head that shares
/// the table needs it on the GPU. Made by <see cref="TryMove"/>, which leaves the model alone when it cannot.
/// </summary>
public sealed class HostEmbedding : Embedding
{
    readonly HostMappedMemory _mapped;

    HostEmbedding(Embedding reference, Tensor host, HostMappedMemory mapped) : base(reference)
    {
        _mapped = mapped;
        weight = new Parameter(host, requires_grad: false);
        ConditionallyRegisterParameter(nameof(weight), weight);
        train(reference.training);
    }

    /// <summary>
    /// A host-mapped copy of <paramref name="table"/>, whose device tensor is then freed (the caller puts the result in
    /// its place); null with why not when the table is not a frozen contiguous bf16 CUDA tensor or mapping fails.
    /// </summary>
    public static HostEmbedding? TryMove(Embedding table, out string? why)
    {
        var weight = table.weight;
        why = null;
        if (weight.device_type != DeviceType.CUDA || weight.requires_grad) { why = "the table is not a frozen CUDA tensor"; return null; }
        if (!FusedKernels.Usable(weight)) { why = "the fused CUDA kernels are unavailable or the table is not contiguous bf16"; return null; }
        var host = weight.cpu(); // a copy: the device table goes when `weight` is disposed below (no other handle may hold it)
        var mapped = HostMappedMemory.TryMap(host, FusedKernels.Pointer(host), out why);
        if (mapped is null) { host.Dispose(); return null; }
        var moved = new HostEmbedding(table, host, mapped);
        weight.Dispose();
        return moved;
    }

    public override Tensor forward(Tensor ids) => ids.device_type == DeviceType.CUDA
        ? FusedKernels.GatherRows(_mapped.Device, weight.shape[0], weight.shape[1], weight.dtype, ids)
        : base.forward(ids);

    protected override void Dispose(bool disposing)
    {
        if (disposing) _mapped.Dispose(); // before the tensor's memory goes back to libtorch
        base.Dispose(disposing);
    }
}
