using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// Fused bf16 kernels for the training step's memory-bound parts: RMSNorm forward/backward (one pass over a row each
/// instead of ~8 fp32 kernels) and the SwiGLU product forward/backward (one pass instead of 2 forward and ~4 backward).
/// Each reproduces the rounding of the TorchSharp ops it replaces (transformers' op order: values rounded to bf16 where
/// those ops round), so they are checked against the plain path (scripts/gpu/check_kernels.sh). Used only for contiguous,
/// 16-byte-aligned CUDA bf16 tensors; everything else takes the TorchSharp path. LORAKIT_FUSED_KERNELS=0 turns them off.
/// </summary>
public static class FusedKernels
{
    const string Source = """
        typedef unsigned short bf16;
        __device__ __forceinline__ float ld(bf16 v) { return __uint_as_float(((unsigned int)v) << 16); }
        __device__ __forceinline__ bf16 st(float f) {            // round to nearest even, as PyTorch does
            unsigned int u = __float_as_uint(f);
            if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
            u += 0x7fffu + ((u >> 16) & 1u);
            return (bf16)(u >> 16);
        }
        __device__ __forceinline__ float rnd(float f) { return ld(st(f)); }
        struct V8 { bf16 v[8]; };
        __device__ __forceinline__ V8 ld8(const bf16* p) { V8 r; *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p); return r; }
        __device__ __forceinline__ void st8(bf16* p, const V8& r) { *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r); }

        __device__ float block_sum(float v) {
            __shared__ float part[32];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
            if (lane == 0) part[warp] = v;
            __syncthreads();
            v = lane < warps ? part[lane] : 0.f;
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            __syncthreads();
            return v;
        }

        // y = w * bf16(x * rsqrt(mean(x^2) + eps)); rstd kept for backward. One block per row, D % 8 == 0.
        extern "C" __global__ void rmsnorm_fwd(const bf16* x, const bf16* w, bf16* y, float* rstd, int D, float eps) {
            const bf16* xr = x + (long)blockIdx.x * D; bf16* yr = y + (long)blockIdx.x * D;
            float s = 0.f;
            for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) { V8 a = ld8(xr + i); for (int j = 0; j < 8; j++) { float f = ld(a.v[j]); s += f * f; } }
            float r = rsqrtf(block_sum(s) / D + eps);
            for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
                V8 a = ld8(xr + i), g = ld8(w + i), o;
                for (int j = 0; j < 8; j++) o.v[j] = st(ld(g.v[j]) * rnd(ld(a.v[j]) * r));
                st8(yr + i, o);
            }
            if (threadIdx.x == 0) rstd[blockIdx.x] = r;
        }

        // dn = bf16(dy * w); n = x * r; dx = r * (dn - n * mean(dn * n)).
        extern "C" __global__ void rmsnorm_bwd(const bf16* dy, const bf16* x, const bf16* w, const float* rstd, bf16* dx, int D) {
            long off = (long)blockIdx.x * D; float r = rstd[blockIdx.x];
            float s = 0.f;
            for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
                V8 a = ld8(dy + off + i), b = ld8(x + off + i), g = ld8(w + i);
                for (int j = 0; j < 8; j++) s += rnd(ld(a.v[j]) * ld(g.v[j])) * (ld(b.v[j]) * r);
            }
            float dot = block_sum(s) / D;
            for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
                V8 a = ld8(dy + off + i), b = ld8(x + off + i), g = ld8(w + i), o;
                for (int j = 0; j < 8; j++) { float dn = rnd(ld(a.v[j]) * ld(g.v[j])); float n = ld(b.v[j]) * r; o.v[j] = st(r * (dn - n * dot)); }
                st8(dx + off + i, o);
            }
        }

        __device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

        // a = bf16(bf16(silu(g)) * u), n8 = elements / 8.
        extern "C" __global__ void swiglu_fwd(const bf16* g, const bf16* u, bf16* a, long n8) {
            for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n8; k += (long)gridDim.x * blockDim.x) {
                V8 gv = ld8(g + k * 8), uv = ld8(u + k * 8), o;
                for (int j = 0; j < 8; j++) o.v[j] = st(rnd(silu(ld(gv.v[j]))) * ld(uv.v[j]));
                st8(a + k * 8, o);
            }
        }

        // From da: du = bf16(da * s), dg = bf16(bf16(da * u) * sig * (1 + g (1 - sig))), s = bf16(silu(g)).
        extern "C" __global__ void swiglu_bwd(const bf16* da, const bf16* g, const bf16* u, bf16* dg, bf16* du, long n8) {
            for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n8; k += (long)gridDim.x * blockDim.x) {
                V8 dv = ld8(da + k * 8), gv = ld8(g + k * 8), uv = ld8(u + k * 8), og, ou;
                for (int j = 0; j < 8; j++) {
                    float x = ld(gv.v[j]), up = ld(uv.v[j]), d = ld(dv.v[j]);
                    float sig = 1.f / (1.f + expf(-x));
                    float s = rnd(silu(x));
                    ou.v[j] = st(d * s);
                    og.v[j] = st(rnd(d * up) * sig * (1.f + x * (1.f - sig)));
                }
                st8(dg + k * 8, og); st8(du + k * 8, ou);
            }
        }
        """;

    /// <summary>Off: every caller takes its TorchSharp path (checks compare the two; LORAKIT_FUSED_KERNELS=0 starts off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAKIT_FUSED_KERNELS") != "0";

    static readonly Lazy<CudaCompiler?> Compiler = new(() =>
    {
        var c = CudaCompiler.TryLoad(Source, out var why);
        if (c is null) Console.Error.WriteLine($"note: fused CUDA kernels unavailable ({why}); using the TorchSharp path");
        return c;
    });

    /// <summary>True when every tensor is a contiguous, 16-byte-aligned CUDA bf16 tensor and the kernels compiled.</summary>
    public static bool Usable(params Tensor[] ts)
    {
        if (!Enabled) return false;
        foreach (var t in ts)
            if (t.device.type != TorchSharp.DeviceType.CUDA || t.dtype != ScalarType.BFloat16 || !t.is_contiguous() || t.shape[^1] % 8 != 0)
                return false;
        if (Compiler.Value is not { } c) return false;
        return ts.All(t => c.Pointer(t) % 16 == 0);
    }

    static CudaCompiler C => Compiler.Value ?? throw new InvalidOperationException("fused kernels are not available");
    const int Threads = 256;

    static long Rows(Tensor x) => x.numel() / x.shape[^1];
    static int RowThreads(long d) => (int)Math.Clamp((d / 8 + 31) / 32 * 32, 32, 1024);

    /// <summary>RMSNorm of the last dimension: (y in x's shape, rstd [rows, 1] fp32).</summary>
    public static (Tensor y, Tensor rstd) RmsNormForward(Tensor x, Tensor weight, double eps)
    {
        long d = x.shape[^1], rows = Rows(x);
        var y = empty_like(x);
        var rstd = empty([rows, 1], ScalarType.Float32, x.device);
        C.Launch("rmsnorm_fwd", rows, RowThreads(d), x, weight, y, rstd, (int)d, (float)eps);
        return (y, rstd);
    }

    public static Tensor RmsNormBackward(Tensor dy, Tensor x, Tensor weight, Tensor rstd)
    {
        long d = x.shape[^1];
        var dx = empty_like(x);
        C.Launch("rmsnorm_bwd", Rows(x), RowThreads(d), dy, x, weight, rstd, dx, (int)d);
        return dx;
    }

    static long Blocks(long n8) => Math.Max(1, Math.Min((n8 + Threads - 1) / Threads, 65536));

    public static Tensor SwiGluForward(Tensor gate, Tensor up)
    {
        var a = empty_like(gate);
        long n8 = gate.numel() / 8;
        C.Launch("swiglu_fwd", Blocks(n8), Threads, gate, up, a, n8);
        return a;
    }

    /// <summary>(d gate, d up) from the product's gradient.</summary>
    public static (Tensor dg, Tensor du) SwiGluBackward(Tensor da, Tensor gate, Tensor up)
    {
        var (dg, du) = (empty_like(gate), empty_like(up));
        long n8 = gate.numel() / 8;
        C.Launch("swiglu_bwd", Blocks(n8), Threads, da, gate, up, dg, du, n8);
        return (dg, du);
    }
}
