using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// Fused bf16 kernels for the training step's memory-bound parts: RMSNorm forward/backward (one pass over a row each
/// instead of ~8 fp32 kernels) and the SwiGLU product forward/backward (one pass instead of 2 forward and ~4 backward).
/// Each reproduces the rounding of the TorchSharp ops it replaces (transformers' op order: values rounded to bf16 where
/// those ops round), so they are checked against the plain path (`lorakit check-kernels`). Used only for contiguous,
/// 16-byte-aligned CUDA bf16 tensors; everything else takes the TorchSharp path. LORAKIT_FUSED_KERNELS=0 turns them off.
/// </summary>
internal static class FusedKernels
{
    const string Source = """
        typedef unsigned short bf16;
        #define NEG_INF __uint_as_float(0xff800000u)
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

        // From da: du = bf16(da * s), dg = bf16(bf16(da * u) * sig * (1 + g (1 - sig))), s = bf16(silu(g)); with
        // write_a also the product a = bf16(s * u) (as swiglu_fwd), which the down adapter's dA needs. dg may be da.
        extern "C" __global__ void swiglu_bwd(const bf16* da, const bf16* g, const bf16* u, bf16* dg, bf16* du, bf16* a, int write_a, long n8) { // outputs may alias inputs
            for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n8; k += (long)gridDim.x * blockDim.x) {
                V8 dv = ld8(da + k * 8), gv = ld8(g + k * 8), uv = ld8(u + k * 8), og, ou, oa;
                for (int j = 0; j < 8; j++) {
                    float x = ld(gv.v[j]), up = ld(uv.v[j]), d = ld(dv.v[j]);
                    float sig = 1.f / (1.f + expf(-x));
                    float s = rnd(silu(x));
                    ou.v[j] = st(d * s);
                    og.v[j] = st(rnd(d * up) * sig * (1.f + x * (1.f - sig)));
                    oa.v[j] = st(s * up);
                }
                st8(dg + k * 8, og); st8(du + k * 8, ou);
                if (write_a) st8(a + k * 8, oa);
            }
        }

        // out[r] = table[ids[r]] in 16-byte vectors, v16 per row; the table may be host memory mapped for the device.
        // Ids outside [0, vocab) give zero rows (a kernel cannot raise; callers pass tokenizer ids).
        extern "C" __global__ void gather_rows(const uint4* table, const long long* ids, uint4* out, long rows, long v16, long vocab) {
            for (long r = blockIdx.x; r < rows; r += gridDim.x) {
                long long id = ids[r];
                bool ok = id >= 0 && id < vocab;
                for (long i = threadIdx.x; i < v16; i += blockDim.x) out[r * v16 + i] = ok ? table[id * v16 + i] : make_uint4(0, 0, 0, 0);
            }
        }

        // RoPE (rotate_half layout) on x [B, T, H, D] with cos/sin [B, T, D], pairs (d, d + D/2) per thread-vector, with
        // the roundings of x*cos + rotate_half(x)*sin in bf16; backward = the transposed rotation of dy.
        // n8 = B*T*H*(D/2)/8, h = heads, h8 = (D/2)/8.
        extern "C" __global__ void rope(const bf16* x, const bf16* cs, const bf16* sn, bf16* y, long n8, long h, long h8, int backward) {
            for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n8; k += (long)gridDim.x * blockDim.x) {
                long bth = k / h8, c = (k % h8) * 8, half = h8 * 8, bt = bth / h;
                const bf16* xr = x + bth * 2 * half; bf16* yr = y + bth * 2 * half;
                const bf16* cr = cs + bt * 2 * half; const bf16* sr = sn + bt * 2 * half;
                V8 x1 = ld8(xr + c), x2 = ld8(xr + half + c), c1 = ld8(cr + c), c2 = ld8(cr + half + c), s1 = ld8(sr + c), s2 = ld8(sr + half + c), o1, o2;
                for (int j = 0; j < 8; j++) {
                    float a = ld(x1.v[j]), b = ld(x2.v[j]);
                    if (!backward) {
                        o1.v[j] = st(rnd(a * ld(c1.v[j])) - rnd(b * ld(s1.v[j])));
                        o2.v[j] = st(rnd(b * ld(c2.v[j])) + rnd(a * ld(s2.v[j])));
                    } else {
                        o1.v[j] = st(rnd(a * ld(c1.v[j])) + rnd(b * ld(s2.v[j])));
                        o2.v[j] = st(rnd(b * ld(c2.v[j])) - rnd(a * ld(s1.v[j])));
                    }
                }
                st8(yr + c, o1); st8(yr + half + c, o2);
            }
        }

        // Cross-entropy of one row of bf16 logits with its gradient, in place: loss = logsumexp(x) - x[t] in fp32 (as
        // log_softmax of the fp32-upcast logits), then the row is overwritten with bf16(softmax(x) - onehot(t)), the
        // gradient transformers casts back. t < 0: ignored row, loss 0 and a zero gradient. One block per row, V % 8 == 0.
        __device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
            float mx = fmaxf(m, m2);
            if (mx == NEG_INF) { m = mx; s = 0.f; return; }
            s = s * expf(m - mx) + s2 * expf(m2 - mx);
            m = mx;
        }
        extern "C" __global__ void cross_entropy_rows(bf16* logits, const long long* targets, float* loss, long V) {
            __shared__ float sm[32], ss[32];
            __shared__ float picked;
            bf16* row = logits + (long)blockIdx.x * V;
            long long t = targets[blockIdx.x];
            if (t < 0) {
                V8 z; for (int j = 0; j < 8; j++) z.v[j] = 0;
                for (long i = threadIdx.x * 8; i < V; i += blockDim.x * 8) st8(row + i, z);
                if (threadIdx.x == 0) loss[blockIdx.x] = 0.f;
                return;
            }
            if (threadIdx.x == 0) picked = ld(row[t]);
            float m = NEG_INF, s = 0.f;
            for (long i = threadIdx.x * 8; i < V; i += blockDim.x * 8) {
                V8 a = ld8(row + i);
                for (int j = 0; j < 8; j++) {   // online logsumexp: one exp per element
                    float x = ld(a.v[j]);
                    if (x > m) { s = s * expf(m - x) + 1.f; m = x; } else s += expf(x - m);
                }
            }
            for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
            int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
            if (lane == 0) { sm[warp] = m; ss[warp] = s; }
            __syncthreads();
            m = lane < warps ? sm[lane] : NEG_INF; s = lane < warps ? ss[lane] : 0.f;
            for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
            float lse = m + logf(s);
            if (threadIdx.x == 0) loss[blockIdx.x] = lse - picked;
            for (long i = threadIdx.x * 8; i < V; i += blockDim.x * 8) {
                V8 a = ld8(row + i), o;
                for (int j = 0; j < 8; j++) { float p = expf(ld(a.v[j]) - lse); o.v[j] = st(i + j == t ? p - 1.f : p); }
                st8(row + i, o);
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

    /// <summary>RoPE on x [B, T, H, D] with cos/sin [B, T, D]; <paramref name="backward"/> applies the transposed rotation (to dy).</summary>
    public static Tensor Rope(Tensor x, Tensor cos, Tensor sin, bool backward)
    {
        var y = empty_like(x);
        long d = x.shape[^1], h = x.shape[^2];
        long n8 = x.numel() / 16;
        C.Launch("rope", Blocks(n8), Threads, x, cos, sin, y, n8, h, d / 16, backward ? 1 : 0);
        return y;
    }

    /// <summary>
    /// Per-row cross-entropy of bf16 logits [rows, V] against int64 targets [rows] (negative = ignored), fp32 losses out;
    /// the logits are overwritten with the loss's gradient with respect to them (softmax − one-hot, bf16).
    /// </summary>
    public static Tensor CrossEntropyInPlace(Tensor logits, Tensor targets)
    {
        if (targets.dtype != ScalarType.Int64 || !targets.is_contiguous() || targets.numel() != logits.shape[0])
            throw new ArgumentException("targets must be contiguous int64, one per row");
        var loss = empty(logits.shape[0], ScalarType.Float32, logits.device);
        C.Launch("cross_entropy_rows", logits.shape[0], 512, logits, targets, loss, logits.shape[1]);
        return loss;
    }

    /// <summary>The address of a tensor's first element (host or device).</summary>
    public static IntPtr Pointer(Tensor t) => C.Pointer(t);

    /// <summary>
    /// Rows <paramref name="ids"/> (int64, any shape, on the GPU) of a [vocab, dim] table at <paramref name="table"/>, a
    /// device address (host memory mapped by <see cref="HostMappedMemory"/> works: the rows come over PCIe), as a
    /// [ids…, dim] tensor. Rows must be a multiple of 16 bytes.
    /// </summary>
    public static Tensor GatherRows(IntPtr table, long vocab, long dim, ScalarType dtype, Tensor ids)
    {
        var out_ = empty(ids.shape.Append(dim).ToArray(), dtype, ids.device);
        long rowBytes = dim * out_.ElementSize;
        if (rowBytes % 16 != 0 || ids.dtype != ScalarType.Int64) throw new ArgumentException("rows must be a multiple of 16 bytes and ids int64");
        using var flat = ids.contiguous();
        long rows = flat.numel();
        if (rows > 0) C.Launch("gather_rows", Math.Min(rows, 65535), Threads, table, flat, out_, rows, rowBytes / 16, vocab);
        return out_;
    }

    static long Blocks(long n8) => Math.Max(1, Math.Min((n8 + Threads - 1) / Threads, 65536));

    public static Tensor SwiGluForward(Tensor gate, Tensor up)
    {
        var a = empty_like(gate);
        long n8 = gate.numel() / 8;
        C.Launch("swiglu_fwd", Blocks(n8), Threads, gate, up, a, n8);
        return a;
    }

    /// <summary>
    /// (d gate, d up) from the product's gradient, and with <paramref name="product"/> the product a = silu(g)·u itself
    /// (same values as <see cref="SwiGluForward"/>) from the same pass. Each element is read before it is written, so the
    /// results reuse their inputs' memory: d gate is written over <paramref name="da"/>, d up over <paramref name="up"/>
    /// and the product over <paramref name="gate"/> (two [tokens, intermediate] buffers less at the backward's peak).
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? a) SwiGluBackward(Tensor da, Tensor gate, Tensor up, bool product)
    {
        long n8 = gate.numel() / 8;
        C.Launch("swiglu_bwd", Blocks(n8), Threads, da, gate, up, da, up, gate, product ? 1 : 0, n8);
        return (da, up.alias(), product ? gate.alias() : null);
    }
}
