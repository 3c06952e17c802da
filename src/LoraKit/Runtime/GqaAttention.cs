using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoraKit.Runtime;

/// <summary>
/// Causal attention for grouped-query models without repeating k and v: ATen's <c>scaled_dot_product_attention</c> with
/// <c>enable_gqa</c> (PyTorch ≥ 2.5), which TorchSharp 0.107's binding does not expose. The kernels (cuDNN on an H100) map
/// each group of query heads onto its kv head, so neither the repeated copies of k and v nor their backward sums exist.
/// <para>
/// The op is called through the dispatcher by its C++ name (<c>at::_ops::scaled_dot_product_attention::call</c>), so
/// autograd, the device dispatch and CUDA graph capture work as for any ATen op. ABI (x86-64 SysV, libstdc++): tensors
/// by const reference are TorchSharp's handles (<c>at::Tensor*</c>); the returned <c>at::Tensor</c> is not trivially
/// copyable, so it is written through a hidden first pointer, allocated with <c>operator new</c> because TorchSharp
/// frees handles with <c>delete</c>; <c>std::optional&lt;at::Tensor&gt;</c> is the TensorImpl pointer then an engaged
/// flag; <c>std::optional&lt;double&gt;</c> is passed by value (on the stack here: the six integer registers are taken).
/// </para>
/// </summary>
internal static unsafe class GqaAttention
{
    [StructLayout(LayoutKind.Sequential)]
    struct OptionalTensor { public IntPtr Impl; public byte Engaged; }

    [StructLayout(LayoutKind.Sequential)]
    struct OptionalDouble { public double Value; public byte Engaged; }

    // (result, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> result
    static readonly delegate* unmanaged<IntPtr, IntPtr, IntPtr, IntPtr, OptionalTensor*, double, byte, OptionalDouble, byte, IntPtr> Sdpa;
    static readonly delegate* unmanaged<nuint, IntPtr> OperatorNew;

    static GqaAttention()
    {
        const string Name = "_ZN2at4_ops28scaled_dot_product_attention4callERKNS_6TensorES4_S4_RKSt8optionalIS2_EdbS5_IdEb";
        _ = ones(1); // make sure TorchSharp has loaded libtorch
        foreach (var lib in new[] { "libtorch_cpu.so", "libtorch.so" })
            if (NativeLibrary.TryLoad(lib, out var h) && NativeLibrary.TryGetExport(h, Name, out var fn))
            {
                Sdpa = (delegate* unmanaged<IntPtr, IntPtr, IntPtr, IntPtr, OptionalTensor*, double, byte, OptionalDouble, byte, IntPtr>)fn;
                break;
            }
        if (NativeLibrary.TryLoad("libstdc++.so.6", out var std) && NativeLibrary.TryGetExport(std, "_Znwm", out var alloc))
            OperatorNew = (delegate* unmanaged<nuint, IntPtr>)alloc;
    }

    /// <summary>Whether the loaded libtorch exports the op (it does from 2.5 on; older ones fall back to repeating k/v).</summary>
    public static bool Available => Sdpa != null && OperatorNew != null;

    /// <summary>
    /// Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D] (H a multiple of Hkv), scaled by 1/√D unless
    /// <paramref name="scale"/> is given; strided views are fine.
    /// </summary>
    public static Tensor Causal(Tensor q, Tensor k, Tensor v, double? scale = null)
    {
        if (!Available) throw new InvalidOperationException("the loaded libtorch does not export at::_ops::scaled_dot_product_attention::call with enable_gqa (PyTorch 2.5 or newer)");
        // A C++ exception cannot cross into .NET (it would end the process), so everything the op would reject is
        // checked here first.
        bool ok = q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.shape.SequenceEqual(v.shape)
            && q.shape[0] == k.shape[0] && q.shape[2] == k.shape[2] && q.shape[3] == k.shape[3]
            && k.shape[1] > 0 && q.shape[1] % k.shape[1] == 0
            && q.dtype == k.dtype && q.dtype == v.dtype && SameDevice(q, k) && SameDevice(q, v)
            && q.dtype is ScalarType.Float32 or ScalarType.Float64 or ScalarType.BFloat16 or ScalarType.Float16;
        if (!ok)
            throw new ArgumentException($"expected floating q [B, H, T, D] and k, v [B, Hkv, T, D] (H a multiple of Hkv) of one dtype on one device; got {Describe(q)}, {Describe(k)}, {Describe(v)}");
        var noMask = new OptionalTensor();
        var s = new OptionalDouble { Value = scale ?? 0, Engaged = (byte)(scale.HasValue ? 1 : 0) };
        var result = OperatorNew((nuint)IntPtr.Size); // an at::Tensor is one intrusive pointer
        Sdpa(result, q.Handle, k.Handle, v.Handle, &noMask, 0.0, 1, s, 1);
        return Tensor.UnsafeCreateTensor(result);
    }

    static bool SameDevice(Tensor a, Tensor b) => a.device_type == b.device_type && a.device_index == b.device_index;

    static string Describe(Tensor t) => $"{t.dtype} [{string.Join(", ", t.shape)}] on {t.device}";
}
