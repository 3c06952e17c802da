using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// Dequantization of bitsandbytes' storage on the GPU in one pass (NVRTC), the fast path of the quantized base's
/// per-forward dequantization: the reference (<c>Quantization.Blockwise4Bit.Dequantize</c>) unpacks codes to int64,
/// gathers fp32 values and scales them in ~10 kernels and ~20 bytes of traffic per weight; here each thread reads 4
/// packed bytes and writes 8 weights in the output dtype (≈ 2.5 bytes per bf16 weight). The arithmetic is the
/// reference's, rounded at the same places (no fused multiply-add), so the output is bit-identical:
/// absmax = nested_map[code]·nested_absmax[block/256] + offset (double quantization), w = table[code]·absmax, then
/// one rounding to bf16/fp16 (nearest even) or none for fp32. int8 storage: w = (q·SCB[row])·fp32(1/127).
/// Tensor arguments are raw device buffers; callers pass contiguous CUDA tensors.
/// </summary>
internal static class DequantKernels
{
    const string Source = """
        typedef unsigned short u16;
        __device__ __forceinline__ u16 to_bf16(float f) {            // round to nearest even, as PyTorch's cast
            unsigned int u = __float_as_uint(f);
            if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
            u += 0x7fffu + ((u >> 16) & 1u);
            return (u16)(u >> 16);
        }
        __device__ __forceinline__ u16 to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

        // kind: 0 fp32, 1 bf16, 2 fp16. Eight consecutive outputs (one 16- or 32-byte store when whole and aligned).
        __device__ __forceinline__ void store8(void* out, int kind, long i, const float* v, int count) {
            if (kind == 0) { float* o = (float*)out + i; for (int j = 0; j < count; j++) o[j] = v[j]; return; }
            u16 h[8];
            for (int j = 0; j < count; j++) h[j] = kind == 1 ? to_bf16(v[j]) : to_f16(v[j]);
            u16* o = (u16*)out + i;
            if (count == 8) *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(h);
            else for (int j = 0; j < count; j++) o[j] = h[j];
        }

        // 4-bit NF4/FP4: data holds n codes two per byte, the first in the high nibble; blocks of `blocksize` share an
        // absmax (fp32, or uint8 codes with nested absmax per `nested_blocksize` blocks when nested != 0). n8 = ceil(n/8).
        extern "C" __global__ void dequant_4bit(const unsigned char* data, const void* absmax, const float* table,
                const float* nested_absmax, const float* nested_map, float offset, int nested, int blocksize, int nested_blocksize,
                void* out, int kind, long n, long n8) {
            __shared__ float t[16];
            if (threadIdx.x < 16) t[threadIdx.x] = table[threadIdx.x];
            __syncthreads();
            for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n8; k += (long)gridDim.x * blockDim.x) {
                long i = k * 8;
                int count = n - i < 8 ? (int)(n - i) : 8;
                long b = i / blocksize;                     // blocksize % 8 == 0: the eight share a block
                float am;
                if (nested) {
                    unsigned char c = ((const unsigned char*)absmax)[b];
                    am = __fadd_rn(__fmul_rn(nested_map[c], nested_absmax[b / nested_blocksize]), offset);
                } else am = ((const float*)absmax)[b];
                float v[8];
                for (int j = 0; j < count; j += 2) {
                    unsigned char byte = data[(i + j) >> 1];
                    v[j] = __fmul_rn(t[byte >> 4], am);
                    if (j + 1 < count) v[j + 1] = __fmul_rn(t[byte & 15], am);
                }
                store8(out, kind, i, v, count);
            }
        }

        // int8 row-wise: q [rows, cols] int8, scb [rows] fp32; w = (q * scb[row]) * inv127.
        extern "C" __global__ void dequant_int8(const signed char* q, const float* scb, float inv127, void* out, int kind, long cols, long n, long n8) {
            for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n8; k += (long)gridDim.x * blockDim.x) {
                long i = k * 8;
                int count = n - i < 8 ? (int)(n - i) : 8;
                float v[8];
                for (int j = 0; j < count; j++) v[j] = __fmul_rn(__fmul_rn((float)q[i + j], scb[(i + j) / cols]), inv127);
                store8(out, kind, i, v, count);
            }
        }
        """;

    static readonly Lazy<CudaCompiler?> Compiler = new(() =>
    {
        var c = CudaCompiler.TryLoad(Source, out var why);
        if (c is null) Console.Error.WriteLine($"note: CUDA dequantization kernels unavailable ({why}); quantized layers dequantize with TorchSharp ops");
        return c;
    });

    const int Threads = 256;
    static long _launches;

    /// <summary>Kernel launches so far (checks assert the kernel ran rather than a fallback that matches trivially).</summary>
    public static long Launches => Interlocked.Read(ref _launches);

    /// <summary>Whether the kernels apply to a tensor on <paramref name="device"/> (CUDA, compiled, and not switched off by LORAKIT_FUSED_KERNELS=0).</summary>
    public static bool Usable(Device device) =>
        FusedKernels.Enabled && device.type == TorchSharp.DeviceType.CUDA && Compiler.Value is not null;

    static CudaCompiler C => Compiler.Value ?? throw new InvalidOperationException("CUDA dequantization kernels are not available");

    static int Kind(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 0,
        ScalarType.BFloat16 => 1,
        ScalarType.Float16 => 2,
        _ => throw new ArgumentException($"dequantization writes fp32, bf16 or fp16, not {dtype}"),
    };

    static long Blocks(long n8) => Math.Max(1, Math.Min((n8 + Threads - 1) / Threads, 65536));

    /// <summary>
    /// The [shape] weight in <paramref name="dtype"/> from 4-bit storage (see the class summary); <paramref name="table"/> is
    /// the 16-entry fp32 code table on the device; <paramref name="nestedAbsmax"/>/<paramref name="nestedMap"/> null
    /// when absmax is fp32.
    /// </summary>
    public static Tensor Dequantize4Bit(Tensor data, Tensor absmax, Tensor table, Tensor? nestedAbsmax, Tensor? nestedMap, float offset,
        int blocksize, int nestedBlocksize, long[] shape, ScalarType dtype)
    {
        if (blocksize % 8 != 0) throw new ArgumentException($"blocksize {blocksize} is not a multiple of 8");
        long n = shape.Aggregate(1L, (a, b) => a * b);
        var out_ = empty(shape, dtype, data.device);
        long n8 = (n + 7) / 8;
        bool nested = nestedAbsmax is not null;
        Interlocked.Increment(ref _launches);
        if (n > 0)
            C.Launch("dequant_4bit", Blocks(n8), Threads, data, absmax, table, nested ? nestedAbsmax! : absmax, nested ? nestedMap! : absmax,
                offset, nested ? 1 : 0, blocksize, nestedBlocksize, out_, Kind(dtype), n, n8);
        return out_;
    }

    /// <summary>The [rows, cols] weight in <paramref name="dtype"/> from int8 row-wise storage.</summary>
    public static Tensor DequantizeInt8(Tensor q, Tensor scb, float inverseOf127, ScalarType dtype)
    {
        long cols = q.shape[1], n = q.numel();
        var out_ = empty(q.shape, dtype, q.device);
        long n8 = (n + 7) / 8;
        Interlocked.Increment(ref _launches);
        if (n > 0) C.Launch("dequant_int8", Blocks(n8), Threads, q, scb, inverseOf127, out_, Kind(dtype), cols, n, n8);
        return out_;
    }
}
