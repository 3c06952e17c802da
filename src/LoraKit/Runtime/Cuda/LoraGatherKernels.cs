using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// Gathered LoRA for a batch that mixes adapters (Punica's BGMV "shrink" and "expand"): every row n reads its own
/// adapter's A and B straight from the stacked tensors by its slot s_n, so no per-row copy of the adapters is made.
/// shrink: v[n, r] = Σ_k x[n, k]·A[s_n, r, k] (fp32); expand: y[n, o] += Σ_r v[n, r]·B[s_n, o, r], rounded once to
/// y's dtype. Rows of slot 0 (the base model) read nothing and add nothing. fp32 accumulation; bf16, fp16 or fp32
/// tensors, all of one dtype. Capturable in a CUDA graph (no host synchronisation, the current stream).
/// </summary>
internal static class LoraGatherKernels
{
    const string Source = """
        typedef unsigned short u16;
        __device__ __forceinline__ float bf16_to_f(u16 h) { return __uint_as_float(((unsigned int)h) << 16); }
        __device__ __forceinline__ float f16_to_f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
        __device__ __forceinline__ u16 to_bf16(float f) {
            unsigned int u = __float_as_uint(f);
            if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
            u += 0x7fffu + ((u >> 16) & 1u);
            return (u16)(u >> 16);
        }
        __device__ __forceinline__ u16 to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
        __device__ __forceinline__ float ld(const void* p, long i, int kind) {
            if (kind == 0) return ((const float*)p)[i];
            u16 h = ((const u16*)p)[i];
            return kind == 1 ? bf16_to_f(h) : f16_to_f(h);
        }
        __device__ __forceinline__ void st(void* p, long i, float v, int kind) {
            if (kind == 0) ((float*)p)[i] = v;
            else ((u16*)p)[i] = kind == 1 ? to_bf16(v) : to_f16(v);
        }

        // One block per (row, rank index): a dot product of x[n] with A[s_n, r] over `in`.
        extern "C" __global__ void lora_shrink(const void* x, const void* a, const long long* slots, float* v, int kind, int R, long in) {
            int n = blockIdx.x / R, r = blockIdx.x % R;
            long s = slots[n];
            if (s == 0) { if (threadIdx.x == 0) v[(long)n * R + r] = 0.f; return; }
            const long xo = (long)n * in, ao = (s * R + r) * in;
            float acc = 0.f;
            for (long k = threadIdx.x; k < in; k += blockDim.x) acc += ld(x, xo + k, kind) * ld(a, ao + k, kind);
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
            __shared__ float part[32];
            if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
            __syncthreads();
            if (threadIdx.x < 32) {
                acc = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
                if (threadIdx.x == 0) v[(long)n * R + r] = acc;
            }
        }

        // One thread per output element: y[n, o] += v[n, :]·B[s_n, o, :].
        extern "C" __global__ void lora_expand(const float* v, const void* b, const long long* slots, void* y, int kind, int R, long outF, long total) {
            long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;
            if (idx >= total) return;
            long n = idx / outF, o = idx - n * outF;
            long s = slots[n];
            if (s == 0) return;
            const long bo = (s * outF + o) * R;
            float acc = 0.f;
            for (int r = 0; r < R; r++) acc += v[n * R + r] * ld(b, bo + r, kind);
            st(y, idx, ld(y, idx, kind) + acc, kind);
        }
        """;

    static readonly Lazy<CudaCompiler?> Compiler = new(() =>
    {
        var c = CudaCompiler.TryLoad(Source, out var why);
        if (c is null) Console.Error.WriteLine($"note: CUDA gathered-LoRA kernels unavailable ({why}); mixed-adapter batches gather with TorchSharp ops");
        return c;
    });

    static long _launches;
    public static long Launches => Interlocked.Read(ref _launches);

    public static bool Usable(Device device) => FusedKernels.Enabled && device.type == TorchSharp.DeviceType.CUDA && Compiler.Value is not null;

    static int Kind(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 0,
        ScalarType.BFloat16 => 1,
        ScalarType.Float16 => 2,
        _ => throw new ArgumentException($"gathered LoRA runs in fp32, bf16 or fp16, not {dtype}"),
    };

    /// <summary>
    /// Adds each row's LoRA term into <paramref name="y"/> [N, out] in place: x [N, in], a [slots, R, in], b [slots, out, R]
    /// (scaling folded in), slots int64 [N]; all contiguous on one CUDA device, x/a/b/y of one dtype.
    /// </summary>
    public static void AddInPlace(Tensor x, Tensor a, Tensor b, Tensor slots, Tensor y)
    {
        var c = Compiler.Value ?? throw new InvalidOperationException("CUDA gathered-LoRA kernels are not available");
        if (x.dtype != a.dtype || a.dtype != b.dtype || b.dtype != y.dtype) throw new ArgumentException("x, A, B and y must share one dtype");
        if (slots.dtype != ScalarType.Int64) throw new ArgumentException("slots must be int64");
        foreach (var t in new[] { x, a, b, slots, y })
            if (!t.is_contiguous()) throw new ArgumentException("gathered LoRA needs contiguous tensors");
        long n = x.shape[0], inF = x.shape[1], outF = y.shape[1];
        int r = (int)a.shape[1];
        if (a.shape[2] != inF || b.shape[1] != outF || b.shape[2] != r || y.shape[0] != n || slots.shape[0] != n)
            throw new ArgumentException("gathered LoRA shapes do not agree");
        if (n == 0) return;
        using var v = empty([n, r], ScalarType.Float32, x.device);
        Interlocked.Increment(ref _launches);
        c.Launch("lora_shrink", n * r, 128, x, a, slots, v, Kind(x.dtype), r, inF);
        long total = n * outF;
        c.Launch("lora_expand", (total + 255) / 256, 256, v, b, slots, y, Kind(x.dtype), r, outF, total);
    }
}
