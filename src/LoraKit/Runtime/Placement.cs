using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Runtime;

/// <summary>
/// Where a model runs and in which dtype, from a user's words: the one resolution every loader uses (the CLI's
/// --device/--dtype, the server's settings, the trainer's config). Device "auto" is CUDA when available, else CPU;
/// no dtype means <see cref="Devices.DefaultDType"/> (bf16 on CUDA, fp32 on CPU).
/// </summary>
/// <param name="Device">the resolved device</param>
/// <param name="DType">the dtype of the model's weights</param>
public readonly record struct Placement(Device Device, ScalarType DType)
{
    /// <summary>
    /// Resolves <paramref name="device"/> ("auto", "cpu", "cuda", "cuda:N") and <paramref name="dtype"/> ("fp32", "bf16",
    /// "fp16", or null for the device's default); unknown names throw with the accepted ones.
    /// </summary>
    public static Placement Resolve(string device = "auto", string? dtype = null)
    {
        var d = Devices.Resolve(device);
        return new Placement(d, dtype is null ? Devices.DefaultDType(d) : DTypes.Parse(dtype));
    }
}
