using System.Collections.Concurrent;
using System.Numerics;
using static TorchSharp.torch;

namespace LoraKit.Runtime.Cuda;

/// <summary>
/// Paged-attention decode (one query token per sequence) over a block-paged KV cache, compiled by NVRTC like the
/// project's other kernels and launched on libtorch's current stream, so it is ordered with libtorch's kernels and a
/// CUDA graph captures it. It reads each sequence's keys through its block table, so the serving engine never gathers
/// or concatenates caches. Numerics: scores, softmax and the weighted sum in fp32 with a streaming ("online") softmax,
/// one rounding to the output dtype at the end; so any context length works with fixed registers and shared memory.
/// <para>
/// Work split: one thread block of <see cref="Tuning.Warps"/> warps per (sequence, kv head, group of up to 8 query heads of that
/// kv head, key split). A block loads its query heads once and then streams the keys: each K/V element is read once per
/// head group (GQA's whole point), in 16-byte vectors by a group of lanes sized to the head (D/8 lanes, rounded up to a
/// power of two), warps taking interleaved tiles of keys, several keys' loads in flight per lane. Each lane group keeps
/// its own (max, sum, acc); they merge across the warp by shuffles and across warps in shared memory (in a fixed order,
/// so results are deterministic). Few blocks (small batches, long contexts) split the keys ("flash-decoding"): each split
/// writes a normalised partial output and its log-sum-exp to a workspace, and a second kernel merges them.
/// </para>
/// <para>
/// Graph capture: nothing here synchronises with the host or depends on the data on the host side; the split count and
/// the workspace size depend only on shapes (the block table's width is the capacity), so a captured call replays
/// correctly after seqLens and block tables change in place. Compile each (dtype, head dim, group) before capture
/// (<see cref="Prepare"/> or one eager call): compiling loads a module, which does not belong in a capture.
/// </para>
/// </summary>
internal static class PagedAttentionKernel
{
    /// <summary>Query heads one block serves at most (each costs 16 registers per lane for q and acc).</summary>
    const int MaxHeadsPerBlock = 8;

    /// <summary>A split-K partition is never shorter than this many keys (shorter ones cost more in merging than they win).</summary>
    const int MinSplitKeys = 256;

    const string Body = """
        typedef unsigned short u16;
        typedef unsigned int u32;
        #define NEG_INF __uint_as_float(0xff800000u)
        #define FULL 0xffffffffu
        #define D8 (HEAD_DIM / 8)            // 8-element chunks per head row; lane i of a key group owns chunk i
        #define KW (32 / LANES)              // keys a warp reads at once, one per group of LANES lanes
        #define TK (KW * UNROLL)             // keys per warp per iteration

        #if KIND == 0
        typedef float elem;
        struct Raw { float4 a, b; };
        __device__ __forceinline__ Raw load8(const elem* p) { Raw r; r.a = __ldg((const float4*)p); r.b = __ldg((const float4*)p + 1); return r; }
        __device__ __forceinline__ Raw zero8() { Raw r; r.a = make_float4(0.f, 0.f, 0.f, 0.f); r.b = r.a; return r; }
        __device__ __forceinline__ void unpack(const Raw& r, float* f) {
            f[0] = r.a.x; f[1] = r.a.y; f[2] = r.a.z; f[3] = r.a.w; f[4] = r.b.x; f[5] = r.b.y; f[6] = r.b.z; f[7] = r.b.w;
        }
        __device__ __forceinline__ void store8(elem* p, const float* f) {
            ((float4*)p)[0] = make_float4(f[0], f[1], f[2], f[3]); ((float4*)p)[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
        #else
        typedef u16 elem;
        struct Raw { uint4 a; };
        __device__ __forceinline__ Raw load8(const elem* p) { Raw r; r.a = __ldg((const uint4*)p); return r; }
        __device__ __forceinline__ Raw zero8() { Raw r; r.a = make_uint4(0u, 0u, 0u, 0u); return r; }
        #if KIND == 1
        __device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
        __device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
        __device__ __forceinline__ u32 to16(float f) {               // round to nearest even, as PyTorch's cast
            u32 u = __float_as_uint(f);
            if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu;
            u += 0x7fffu + ((u >> 16) & 1u);
            return u >> 16;
        }
        #else
        __device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
        __device__ __forceinline__ float lo(u32 w) { return h2f((u16)(w & 0xffffu)); }
        __device__ __forceinline__ float hi(u32 w) { return h2f((u16)(w >> 16)); }
        __device__ __forceinline__ u32 to16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
        #endif
        __device__ __forceinline__ void unpack(const Raw& r, float* f) {
            f[0] = lo(r.a.x); f[1] = hi(r.a.x); f[2] = lo(r.a.y); f[3] = hi(r.a.y);
            f[4] = lo(r.a.z); f[5] = hi(r.a.z); f[6] = lo(r.a.w); f[7] = hi(r.a.w);
        }
        __device__ __forceinline__ void store8(elem* p, const float* f) {
            *(uint4*)p = make_uint4(to16(f[0]) | (to16(f[1]) << 16), to16(f[2]) | (to16(f[3]) << 16),
                                    to16(f[4]) | (to16(f[5]) << 16), to16(f[6]) | (to16(f[7]) << 16));
        }
        #endif

        // One block per (sequence n, kv head g, head chunk hc, key split); see PagedAttentionKernel's summary.
        // Cache row of (block b, slot s, kv head g) at ((b * bs + s) * kvH + g) * HEAD_DIM. Block ids outside
        // [0, num_blocks) mask their keys (a kernel cannot raise; reading them would fault the context).
        // splits == 1: writes out; else the normalised partial output and log-sum-exp of this split to part_o/part_lse.
        extern "C" __global__ void __launch_bounds__(WARPS * 32) paged_decode(
                const elem* __restrict__ q, const elem* __restrict__ kc, const elem* __restrict__ vc,
                const int* __restrict__ tables, const int* __restrict__ lens, elem* __restrict__ out,
                float* __restrict__ part_o, float* __restrict__ part_lse,
                int H, int kvH, int group, int head_chunks, int max_blocks, int num_blocks, int log2_bs,
                float scale, float softcap, int window, int split_keys, int splits) {
            const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
            const int kg = lane / LANES, li = lane % LANES;          // key group within the warp, chunk within the row
            int b = blockIdx.x;
            const int split = b % splits; b /= splits;
            const int hc = b % head_chunks; b /= head_chunks;
            const int g = b % kvH, n = b / kvH;
            const int h0 = g * group + hc * GB;                      // GQA: heads g*group .. of kv head g
            const int nh = min(GB, group - hc * GB);
            const bool chunk_ok = li < D8;                           // D/8 not a power of two: the last lanes idle

            int len = min(max(lens[n], 0), max_blocks << log2_bs);
            const int start = window > 0 ? max(0, len - window) : 0;
            int s0 = start, s1 = len;
            if (splits > 1) { s0 = start + split * split_keys; s1 = min(len, s0 + split_keys); }

            float qf[GB][8];                                         // this lane's chunk of each query head, pre-scaled
            #pragma unroll
            for (int j = 0; j < GB; j++) {
                if (j < nh && chunk_ok) unpack(load8(q + ((long)n * H + h0 + j) * HEAD_DIM + li * 8), qf[j]);
                else { for (int e = 0; e < 8; e++) qf[j][e] = 0.f; }
                #pragma unroll
                for (int e = 0; e < 8; e++) qf[j][e] *= scale;
            }

            float m[GB], l[GB], acc[GB][8];                          // online softmax state of this key group
            #pragma unroll
            for (int j = 0; j < GB; j++) { m[j] = NEG_INF; l[j] = 0.f; for (int e = 0; e < 8; e++) acc[j][e] = 0.f; }

            const int* table = tables + (long)n * max_blocks;
            const int slot_mask = (1 << log2_bs) - 1;
            const long row_stride = (long)kvH * HEAD_DIM;
            for (int t0 = s0 + warp * TK; t0 < s1; t0 += WARPS * TK) {
                // Addresses first, then every K and V load of the tile: UNROLL keys' loads in flight per lane.
                long off[UNROLL]; bool ok[UNROLL];
                #pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    const int key = t0 + u * KW + kg;
                    ok[u] = key < s1;
                    const int blk = ok[u] ? __ldg(table + (key >> log2_bs)) : 0;
                    ok[u] = ok[u] && (unsigned)blk < (unsigned)num_blocks;
                    off[u] = (((long)blk << log2_bs) + (key & slot_mask)) * row_stride + (long)g * HEAD_DIM + li * 8;
                }
                Raw kr[UNROLL], vr[UNROLL];
                #pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    if (ok[u] && chunk_ok) { kr[u] = load8(kc + off[u]); vr[u] = load8(vc + off[u]); }
                    else { kr[u] = zero8(); vr[u] = zero8(); }
                }
                // Scores: partial dot products over this lane's chunk, summed over the key group's lanes.
                float s[UNROLL][GB];
                #pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    float kf[8]; unpack(kr[u], kf);
                    #pragma unroll
                    for (int j = 0; j < GB; j++) {
                        float d = 0.f;
                        #pragma unroll
                        for (int e = 0; e < 8; e++) d = fmaf(qf[j][e], kf[e], d);
                        s[u][j] = d;
                    }
                }
                #pragma unroll
                for (int o = LANES / 2; o > 0; o >>= 1) {
                    #pragma unroll
                    for (int u = 0; u < UNROLL; u++) {
                        #pragma unroll
                        for (int j = 0; j < GB; j++) s[u][j] += __shfl_xor_sync(FULL, s[u][j], o);
                    }
                }
                // Softcap after scaling (Gemma 2); masking after the softcap, which would map -inf to -softcap.
                #pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    #pragma unroll
                    for (int j = 0; j < GB; j++) {
                        if (softcap > 0.f) s[u][j] = softcap * tanhf(s[u][j] / softcap);
                        if (!ok[u]) s[u][j] = NEG_INF;
                    }
                }
                // Online softmax: rescale the state to the new max once per tile, then add the tile's keys.
                #pragma unroll
                for (int j = 0; j < GB; j++) {
                    float mx = m[j];
                    #pragma unroll
                    for (int u = 0; u < UNROLL; u++) mx = fmaxf(mx, s[u][j]);
                    const bool live = mx != NEG_INF;                 // all masked so far: keep the empty state
                    const float alpha = live ? __expf(m[j] - mx) : 1.f;
                    float sum = 0.f;
                    #pragma unroll
                    for (int u = 0; u < UNROLL; u++) { s[u][j] = live ? __expf(s[u][j] - mx) : 0.f; sum += s[u][j]; }
                    l[j] = l[j] * alpha + sum;
                    m[j] = mx;
                    #pragma unroll
                    for (int e = 0; e < 8; e++) acc[j][e] *= alpha;
                }
                #pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    float vf[8]; unpack(vr[u], vf);
                    #pragma unroll
                    for (int j = 0; j < GB; j++) {
                        #pragma unroll
                        for (int e = 0; e < 8; e++) acc[j][e] = fmaf(s[u][j], vf[e], acc[j][e]);
                    }
                }
            }

            // Merge the warp's key groups (lanes LANES, 2·LANES, … apart hold the same chunk): a butterfly, so every
            // lane ends with the warp's state.
            #pragma unroll
            for (int o = LANES; o < 32; o <<= 1) {
                #pragma unroll
                for (int j = 0; j < GB; j++) {
                    const float m2 = __shfl_xor_sync(FULL, m[j], o), l2 = __shfl_xor_sync(FULL, l[j], o);
                    const float mx = fmaxf(m[j], m2);
                    const float a1 = mx == NEG_INF ? 0.f : __expf(m[j] - mx), a2 = mx == NEG_INF ? 0.f : __expf(m2 - mx);
                    l[j] = l[j] * a1 + l2 * a2;
                    m[j] = mx;
                    #pragma unroll
                    for (int e = 0; e < 8; e++) acc[j][e] = acc[j][e] * a1 + __shfl_xor_sync(FULL, acc[j][e], o) * a2;
                }
            }

            // Merge the warps in shared memory: block max and sum per head, then the rescaled accumulators added warp by
            // warp in a fixed order (deterministic, unlike atomics).
            __shared__ float sm_m[WARPS][GB], sm_l[WARPS][GB], sm_max[GB], sm_sum[GB];
            __shared__ __align__(16) float red[GB][HEAD_DIM];
            if (lane == 0) {
                #pragma unroll
                for (int j = 0; j < GB; j++) { sm_m[warp][j] = m[j]; sm_l[warp][j] = l[j]; }
            }
            __syncthreads();
            if (threadIdx.x < GB) {
                const int j = threadIdx.x;
                float mx = NEG_INF, sum = 0.f;
                for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm_m[w][j]);
                if (mx != NEG_INF)
                    for (int w = 0; w < WARPS; w++) if (sm_m[w][j] != NEG_INF) sum += sm_l[w][j] * __expf(sm_m[w][j] - mx);
                sm_max[j] = mx; sm_sum[j] = sum;
            }
            __syncthreads();
            for (int w = 0; w < WARPS; w++) {
                if (warp == w && kg == 0 && chunk_ok) {
                    #pragma unroll
                    for (int j = 0; j < GB; j++) {
                        const float f = m[j] == NEG_INF ? 0.f : __expf(m[j] - sm_max[j]);
                        #pragma unroll
                        for (int e = 0; e < 8; e++) red[j][li * 8 + e] = (w == 0 ? 0.f : red[j][li * 8 + e]) + acc[j][e] * f;
                    }
                }
                __syncthreads();
            }

            // Normalise and write: 8 elements per thread (one 16-byte store in bf16/fp16). Empty rows (seqLen 0) give 0.
            for (int i = threadIdx.x; i < GB * D8; i += blockDim.x) {
                const int j = i / D8, d = (i % D8) * 8;
                if (j >= nh) continue;
                const float sum = sm_sum[j], inv = sum > 0.f ? 1.f / sum : 0.f;
                float v[8];
                #pragma unroll
                for (int e = 0; e < 8; e++) v[e] = red[j][d + e] * inv;
                const long row = (long)n * H + h0 + j;
                if (splits == 1) store8(out + row * HEAD_DIM + d, v);
                else {
                    float* p = part_o + (row * splits + split) * HEAD_DIM + d;
                    ((float4*)p)[0] = make_float4(v[0], v[1], v[2], v[3]); ((float4*)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
                    if (d == 0) part_lse[row * splits + split] = sum > 0.f ? sm_max[j] + logf(sum) : NEG_INF;
                }
            }
        }

        // Flash-decoding's second pass: out[row] = Σ_s exp(lse_s - max) o_s / Σ_s exp(lse_s - max), one block per
        // (sequence, query head), D/8 threads (8 elements each). Splits past a row's keys have lse = -inf: weight 0.
        extern "C" __global__ void paged_merge(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                               elem* __restrict__ out, int splits) {
            const long row = blockIdx.x;
            const float* lse = part_lse + row * splits;
            float mx = NEG_INF;
            for (int s = 0; s < splits; s++) mx = fmaxf(mx, lse[s]);
            float wsum = 0.f;
            if (mx != NEG_INF) for (int s = 0; s < splits; s++) wsum += __expf(lse[s] - mx);
            const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
            for (int c = threadIdx.x; c < D8; c += blockDim.x) {
                float v[8];
                #pragma unroll
                for (int e = 0; e < 8; e++) v[e] = 0.f;
                if (mx != NEG_INF)
                    for (int s = 0; s < splits; s++) {
                        if (lse[s] == NEG_INF) continue;
                        const float w = __expf(lse[s] - mx);
                        const float* p = part_o + (row * splits + s) * HEAD_DIM + c * 8;
                        const float4 a = ((const float4*)p)[0], bb = ((const float4*)p)[1];
                        v[0] += w * a.x; v[1] += w * a.y; v[2] += w * a.z; v[3] += w * a.w;
                        v[4] += w * bb.x; v[5] += w * bb.y; v[6] += w * bb.z; v[7] += w * bb.w;
                    }
                #pragma unroll
                for (int e = 0; e < 8; e++) v[e] *= inv;
                store8(out + row * HEAD_DIM + c * 8, v);
            }
        }
        """;

    /// <summary>
    /// The launch shape: <paramref name="Warps"/> per block and <paramref name="Unroll"/> keys whose K/V loads each lane
    /// issues before using them (memory-level parallelism against registers). <see cref="Default"/> is what Decode uses;
    /// checks time others to tune it.
    /// </summary>
    internal readonly record struct Tuning(int Warps, int Unroll)
    {
        /// <summary>4 warps (128 threads: up to ~250 registers a thread for 8 heads' q and acc); 4 keys in flight, fewer
        /// when registers go to more heads or to fp32's twice-as-wide loads.</summary>
        public static Tuning Default(int kind, int headsPerBlock) => new(4, (kind == 0 ? 2 : 4) / (headsPerBlock > 4 ? 2 : 1));

        public override string ToString() => $"{Warps} warps, {Unroll} keys in flight";
    }

    /// <summary>What one compiled module is specialised for; everything else is a kernel argument.</summary>
    readonly record struct Variant(int Kind, int HeadDim, int HeadsPerBlock, Tuning Tuning)
    {
        /// <summary>Lanes per key: D/8 chunks of 8 elements, rounded up to a power of two so shuffles stay inside a group.</summary>
        public int Lanes => (int)BitOperations.RoundUpToPowerOf2((uint)(HeadDim / 8));

        public string Source =>
            $"#define KIND {Kind}\n#define HEAD_DIM {HeadDim}\n#define GB {HeadsPerBlock}\n#define LANES {Lanes}\n" +
            $"#define UNROLL {Tuning.Unroll}\n#define WARPS {Tuning.Warps}\n" + Body;
    }

    static readonly ConcurrentDictionary<Variant, Lazy<(CudaCompiler? Compiler, string? Why)>> Modules = new();
    static long _launches;

    /// <summary>Decode launches so far (checks assert the kernel ran).</summary>
    public static long Launches => Interlocked.Read(ref _launches);

    /// <summary>
    /// Compiles the kernel for this attention shape and dtype now (outside any graph capture); false with the reason when
    /// CUDA, NVRTC or the compile is unavailable (callers then keep a libtorch path).
    /// </summary>
    public static bool Prepare(ScalarType dtype, int numHeads, int numKvHeads, int headDim, out string? why)
    {
        if (numKvHeads < 1 || numHeads < 1 || numHeads % numKvHeads != 0 || headDim % 8 != 0 || headDim is < 8 or > 256)
            throw new ArgumentException($"paged attention: {numHeads} heads over {numKvHeads} kv heads of dim {headDim} (a multiple of 8 up to 256) is not a supported shape");
        var (_, gb) = HeadChunks(numHeads / numKvHeads);
        int kind = Kind(dtype);
        (var c, why) = Module(new Variant(kind, headDim, gb, Tuning.Default(kind, gb)));
        return c is not null;
    }

    static (CudaCompiler? Compiler, string? Why) Module(Variant v) =>
        Modules.GetOrAdd(v, key => new Lazy<(CudaCompiler?, string?)>(() =>
        {
            var c = CudaCompiler.TryLoad(key.Source, out var why);
            return (c, why);
        })).Value;

    static int Kind(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 0,
        ScalarType.BFloat16 => 1,
        ScalarType.Float16 => 2,
        _ => throw new ArgumentException($"paged attention takes fp32, bf16 or fp16, not {dtype}"),
    };

    /// <summary>A group of G query heads per kv head as chunks of at most 8 heads per block, evenly sized (G = 12: 2 × 6).</summary>
    static (int Chunks, int HeadsPerBlock) HeadChunks(int group)
    {
        int chunks = (group + MaxHeadsPerBlock - 1) / MaxHeadsPerBlock;
        return (chunks, (group + chunks - 1) / chunks);
    }

    /// <summary>
    /// q [N, H, D] contiguous; kCache, vCache [numBlocks, blockSize, kvH, D] contiguous (same dtype as q: bf16, fp16 or fp32);
    /// blockTables int32 [N, maxBlocks] contiguous (block ids of each sequence's positions 0.., entries past its length unused);
    /// seqLens int32 [N] (keys to attend for each query, including the current token whose k/v are already in the cache);
    /// output [N, H, D] same dtype as q (written). scale = the scores' scale (head_dim^-½ usually); softcap &gt; 0: score = softcap·tanh(score/softcap) after scaling (Gemma 2), 0: none;
    /// window &gt; 0: attend only the last `window` keys (sliding window; key positions ≥ seqLen − window), 0: all.
    /// GQA: query head h reads kv head h / (H / kvH).
    /// <para>On the device side (a kernel cannot raise): seqLens are clamped to [0, maxBlocks·blockSize], a row with
    /// seqLen 0 gets zeros, and keys whose block id is outside [0, numBlocks) are skipped.</para>
    /// </summary>
    internal static void Decode(Tensor q, Tensor kCache, Tensor vCache, Tensor blockTables, Tensor seqLens, Tensor output, double scale, double softcap, int window) =>
        Decode(q, kCache, vCache, blockTables, seqLens, output, scale, softcap, window, keysPerSplit: 0);

    /// <summary>
    /// <see cref="Decode(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, double, double, int)"/> with the split-K choice
    /// made by the caller: <paramref name="keysPerSplit"/> 0 chooses from the shapes (<see cref="AutoKeysPerSplit"/>),
    /// a negative value never splits, a positive one splits each row's keys into partitions of that many (checks and
    /// timings use it to exercise and compare both paths); <paramref name="tuning"/> null takes <see cref="Tuning.Default"/>.
    /// </summary>
    internal static void Decode(Tensor q, Tensor kCache, Tensor vCache, Tensor blockTables, Tensor seqLens, Tensor output,
        double scale, double softcap, int window, int keysPerSplit, Tuning? tuning = null)
    {
        var s = Validate(q, kCache, vCache, blockTables, seqLens, output, scale, softcap, window);
        if (s.N == 0) return;
        var (chunks, gb) = HeadChunks(s.H / s.KvH);
        int kind = Kind(q.dtype);
        var t = tuning ?? Tuning.Default(kind, gb);
        if (t.Warps is < 1 or > 32 || t.Unroll is < 1 or > 16) throw new ArgumentException($"paged attention: tuning {t} out of range");
        var (c, why) = Module(new Variant(kind, s.D, gb, t));
        if (c is null) throw new InvalidOperationException($"the paged-attention kernel is not available ({why})");
        foreach (var (x, name) in new[] { (q, "q"), (kCache, "kCache"), (vCache, "vCache"), (output, "output") })
            if (c.Pointer(x) % 16 != 0) throw new ArgumentException($"paged attention: {name} must start on a 16-byte boundary (16-byte loads)");

        long baseBlocks = s.N * s.KvH * chunks;
        int capacity = s.MaxBlocks * s.BlockSize;
        int split = keysPerSplit == 0 ? AutoKeysPerSplit(baseBlocks, capacity) : keysPerSplit < 0 ? 0 : keysPerSplit;
        int splits = split > 0 ? (capacity + split - 1) / split : 1;
        if (splits <= 1) { splits = 1; split = capacity; }
        int log2Bs = BitOperations.Log2((uint)s.BlockSize);
        Interlocked.Increment(ref _launches);
        if (splits == 1)
        {
            c.Launch("paged_decode", baseBlocks, t.Warps * 32, q, kCache, vCache, blockTables, seqLens, output, IntPtr.Zero, IntPtr.Zero,
                s.H, s.KvH, s.H / s.KvH, chunks, s.MaxBlocks, s.NumBlocks, log2Bs, (float)scale, (float)softcap, window, split, 1);
            return;
        }
        // The workspace's size depends only on shapes, so a graph replays into the same (temporary) allocation; it is
        // released to the caching allocator on return, after both kernels are queued on this stream (stream-ordered reuse).
        long rows = s.N * s.H;
        using var workspace = empty(rows * splits * (s.D + 1), ScalarType.Float32, q.device);
        var partO = c.Pointer(workspace);
        var partLse = partO + (nint)(rows * splits * s.D * sizeof(float));
        c.Launch("paged_decode", baseBlocks * splits, t.Warps * 32, q, kCache, vCache, blockTables, seqLens, output, partO, partLse,
            s.H, s.KvH, s.H / s.KvH, chunks, s.MaxBlocks, s.NumBlocks, log2Bs, (float)scale, (float)softcap, window, split, splits);
        c.Launch("paged_merge", rows, 32, partO, partLse, output, splits);
    }

    /// <summary>
    /// Keys per split when <paramref name="baseBlocks"/> (sequences × kv heads × head chunks) would leave SMs idle: enough
    /// splits for about two blocks per SM, none shorter than <see cref="MinSplitKeys"/>; 0 (no split) otherwise. It sees
    /// only the capacity (the block table's width), never the lengths, which live on the device.
    /// </summary>
    internal static int AutoKeysPerSplit(long baseBlocks, int capacityKeys)
    {
        int sms = SmCount.Value;
        if (baseBlocks >= sms || capacityKeys < 2 * MinSplitKeys) return 0;
        long splits = Math.Min((2L * sms + baseBlocks - 1) / baseBlocks, capacityKeys / MinSplitKeys);
        if (splits <= 1) return 0;
        long keys = (capacityKeys + splits - 1) / splits;
        return (int)((keys + 63) / 64 * 64);
    }

    delegate int DeviceGetAttributeFn(out int value, int attribute, int device);

    /// <summary>The GPU's SM count (CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT); 132 (an H100/H200) when the driver cannot say.</summary>
    static readonly Lazy<int> SmCount = new(() =>
    {
        const int MultiprocessorCount = 16;
        var get = CudaDriver.TryBind<DeviceGetAttributeFn>("cuDeviceGetAttribute");
        return get is not null && get(out int v, MultiprocessorCount, 0) == 0 && v > 0 ? v : 132;
    });

    /// <summary>The sizes Decode launches with, read from validated arguments.</summary>
    readonly record struct Shape(long N, int H, int KvH, int D, int NumBlocks, int BlockSize, int MaxBlocks);

    /// <summary>
    /// Every host-side rule, checked before anything touches CUDA (so CPU tensors exercise all but the device rule, which
    /// comes last): dtypes, ranks, sizes, contiguity, then one CUDA device.
    /// </summary>
    static Shape Validate(Tensor q, Tensor k, Tensor v, Tensor tables, Tensor lens, Tensor output, double scale, double softcap, int window)
    {
        static ArgumentException Bad(string what) => new($"paged attention: {what}");
        static string Dims(Tensor t) => "[" + string.Join(", ", t.shape) + "]";
        if (q.dim() != 3) throw Bad($"q must be [N, H, D], got {Dims(q)}");
        Kind(q.dtype);
        long n = q.shape[0], h = q.shape[1], d = q.shape[2];
        if (d % 8 != 0 || d < 8 || d > 256) throw Bad($"head dim must be a multiple of 8 up to 256, got {d}");
        if (k.dim() != 4) throw Bad($"kCache must be [numBlocks, blockSize, kvH, D], got {Dims(k)}");
        if (!v.shape.SequenceEqual(k.shape)) throw Bad($"vCache {Dims(v)} must have kCache's shape {Dims(k)}");
        if (k.dtype != q.dtype || v.dtype != q.dtype || output.dtype != q.dtype) throw Bad($"q, kCache, vCache and output must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {output.dtype}");
        long numBlocks = k.shape[0], blockSize = k.shape[1], kvh = k.shape[2];
        if (k.shape[3] != d) throw Bad($"kCache head dim {k.shape[3]} differs from q's {d}");
        if (blockSize < 1 || !BitOperations.IsPow2(blockSize)) throw Bad($"block size must be a power of two, got {blockSize}");
        if (kvh < 1 || h < 1 || h % kvh != 0) throw Bad($"query heads {h} must be a multiple of kv heads {kvh}");
        if (numBlocks > int.MaxValue) throw Bad($"{numBlocks} cache blocks exceed int32 block ids");
        if (tables.dtype != ScalarType.Int32 || tables.dim() != 2 || tables.shape[0] != n || tables.shape[1] < 1)
            throw Bad($"blockTables must be int32 [N={n}, maxBlocks ≥ 1], got {tables.dtype} {Dims(tables)}");
        if (tables.shape[1] * blockSize > 1L << 30) throw Bad($"maxBlocks × blockSize = {tables.shape[1] * blockSize} exceeds 2^30 keys");
        if (lens.dtype != ScalarType.Int32 || lens.dim() != 1 || lens.shape[0] != n) throw Bad($"seqLens must be int32 [N={n}], got {lens.dtype} {Dims(lens)}");
        if (!output.shape.SequenceEqual(q.shape)) throw Bad($"output {Dims(output)} must have q's shape {Dims(q)}");
        foreach (var (t, name) in new[] { (q, "q"), (k, "kCache"), (v, "vCache"), (tables, "blockTables"), (lens, "seqLens"), (output, "output") })
            if (!t.is_contiguous()) throw Bad($"{name} must be contiguous");
        if (!double.IsFinite(scale) || !double.IsFinite(softcap) || softcap < 0) throw Bad($"scale must be finite and softcap finite and ≥ 0, got {scale}, {softcap}");
        if (window < 0) throw Bad($"window must be ≥ 0 (0: no sliding window), got {window}");
        foreach (var (t, name) in new[] { (q, "q"), (k, "kCache"), (v, "vCache"), (tables, "blockTables"), (lens, "seqLens"), (output, "output") })
            if (t.device.type != TorchSharp.DeviceType.CUDA || t.device.index != q.device.index)
                throw Bad($"{name} must be on q's CUDA device, got {t.device}");
        return new(n, (int)h, (int)kvh, (int)d, (int)numBlocks, (int)blockSize, (int)tables.shape[1]);
    }
}
