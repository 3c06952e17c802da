using System.Diagnostics;
using LoraKit.Runtime.Cuda;
using static TorchSharp.torch;

namespace LoraKit.Diagnostics;

/// <summary>
/// GPU checks of the paged-attention decode kernel (<see cref="PagedAttentionKernel"/>) against <see cref="Reference"/>,
/// the same attention in plain libtorch ops (each row's keys gathered through its block table, fp64 scores, softmax,
/// weighted sum): random caches whose blocks are handed out in shuffled order, unused cache slots and spare blocks filled
/// with NaN and unused table entries pointing at other rows' blocks (so reading anything outside a row's keys shows),
/// seqLens from 1 to ~1,500 with rows ending exactly on a block boundary, N ∈ {1, 7, 32}, several head layouts (GQA
/// groups of 1, 4 and 7, head dims 64 to 256), block sizes 16 and 32, fp32/bf16/fp16, sliding windows, softcaps, both
/// the one-pass and the split-K path; then the kernel captured in a CUDA graph and replayed after seqLens and block
/// tables change in place; then timings (reported, not asserted). Pass: relative max error (max |kernel − reference| /
/// max |reference|) ≤ 1e-4 in fp32 and ≤ 1e-2 in bf16/fp16, and no NaN. Run by the GPU tests and <c>lorakit check-kernels</c>.
/// </summary>
public static class PagedAttentionChecks
{
    static double Tolerance(ScalarType dtype) => dtype == ScalarType.Float32 ? 1e-4 : 1e-2;

    /// <summary>One attention problem: shapes, dtype, options and how the kernel splits keys (0 auto, −1 never, n keys).</summary>
    sealed record Case(int N, int H, int KvH, int D, int BlockSize, ScalarType Dtype, double Softcap = 0, int Window = 0,
        int KeysPerSplit = 0, double QScale = 1, int MaxLen = 1500, int[]? Rows = null)
    {
        /// <summary>The batch sizes the case runs with.</summary>
        public int[] Ns => Rows ?? [1, 7, 32];

        public string Name =>
            $"H={H} kvH={KvH} D={D} bs={BlockSize} {DeviceInfo.DTypeName(Dtype)}" + (Softcap > 0 ? $" softcap={Softcap}" : "") +
            (Window > 0 ? $" window={Window}" : "") + (QScale != 1 ? $" q×{QScale}" : "") +
            (KeysPerSplit switch { 0 => "", < 0 => " no split", _ => $" split={KeysPerSplit} keys" });
    }

    /// <summary>The tensors of one problem on the device (and the lengths on the host).</summary>
    sealed record Problem(Tensor Q, Tensor K, Tensor V, Tensor Tables, Tensor Lens, int[] HostLens) : IDisposable
    {
        public void Dispose() { foreach (var t in new[] { Q, K, V, Tables, Lens }) t.Dispose(); }
    }

    /// <summary>The correctness cases; one result line per case (all its N values).</summary>
    public static List<KernelChecks.Result> Exactness(Device dev)
    {
        var results = new List<KernelChecks.Result>();
        var cases = new List<Case>();
        foreach (var (h, kvh, d) in new[] { (32, 8, 64), (16, 16, 128), (8, 2, 256), (14, 2, 64) })
            foreach (int bs in new[] { 16, 32 })
                foreach (var dt in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
                    cases.Add(new Case(0, h, kvh, d, bs, dt));
        foreach (var dt in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
        {
            cases.Add(new Case(0, 32, 8, 64, 16, dt, Window: 100));
            cases.Add(new Case(0, 32, 8, 64, 16, dt, Window: 100, KeysPerSplit: 64));
            cases.Add(new Case(0, 8, 2, 128, 32, dt, Window: 1));
            cases.Add(new Case(0, 16, 8, 128, 16, dt, Softcap: 2, QScale: 4));                  // softcap that bites
            cases.Add(new Case(0, 8, 4, 256, 16, dt, Softcap: 50, Window: 700, KeysPerSplit: 256)); // Gemma 2-like
            cases.Add(new Case(0, 32, 8, 64, 16, dt, QScale: 30));                              // near one-hot softmax
        }
        cases.Add(new Case(0, 10, 2, 80, 16, ScalarType.BFloat16));        // D/8 = 10: lanes 10..15 of a key group idle
        cases.Add(new Case(0, 12, 4, 96, 32, ScalarType.Float16));
        cases.Add(new Case(0, 10, 2, 80, 16, ScalarType.Float32, KeysPerSplit: 128));
        cases.Add(new Case(0, 32, 2, 64, 16, ScalarType.BFloat16));        // group 16: two blocks of 8 heads per kv head
        cases.Add(new Case(0, 24, 2, 128, 16, ScalarType.Float32));        // group 12: two blocks of 6
        cases.Add(new Case(0, 18, 2, 64, 16, ScalarType.Float32));         // group 9: blocks of 5 and 4 heads (one masked)
        cases.Add(new Case(0, 8, 8, 64, 1, ScalarType.Float32, MaxLen: 300));  // block size 1
        cases.Add(new Case(0, 8, 2, 64, 16, ScalarType.BFloat16, KeysPerSplit: -1, MaxLen: 6000));   // long rows in one pass
        cases.Add(new Case(0, 8, 2, 64, 16, ScalarType.BFloat16, KeysPerSplit: 64, MaxLen: 6000));   // and in 94 splits
        cases.Add(new Case(0, 32, 8, 64, 16, ScalarType.BFloat16, MaxLen: 600, Rows: [256]));      // the largest batch

        manual_seed(21);
        var rng = new Random(21);
        foreach (var c in cases)
        {
            using var scope = NewDisposeScope();
            long launches = PagedAttentionKernel.Launches;
            var parts = new List<string>();
            bool pass = true;
            foreach (int n in c.Ns)
            {
                using var p = Build(c with { N = n }, rng, dev);
                double err = Error(p, c, dev);
                pass &= err <= Tolerance(c.Dtype);                      // false for NaN
                parts.Add($"N={n} {err:E2}");
            }
            bool ran = PagedAttentionKernel.Launches - launches == c.Ns.Length;
            results.Add(new(pass && ran, $"paged attention {c.Name}: rel max err vs reference {string.Join(", ", parts)} (tol {Tolerance(c.Dtype):0e0})" +
                                         (ran ? "" : "; the kernel did not run")));
        }
        results.Add(EmptyRows(dev));
        return results;
    }

    /// <summary>Rows with seqLen 0 (padding rows of a batch bucket) give zeros and leave the other rows right.</summary>
    static KernelChecks.Result EmptyRows(Device dev)
    {
        using var scope = NewDisposeScope();
        var c = new Case(6, 32, 8, 64, 16, ScalarType.BFloat16);
        using var p = Build(c, new Random(3), dev);
        p.HostLens[1] = p.HostLens[4] = 0;
        p.Lens.copy_(tensor(p.HostLens, ScalarType.Int32));
        double err = Error(p, c, dev);
        return new(err <= Tolerance(c.Dtype), $"paged attention rows with seqLen 0 give zeros: rel max err {err:E2}");
    }

    /// <summary>Runs the kernel on a problem and returns its relative max error against the reference (NaN if any NaN).</summary>
    static double Error(Problem p, Case c, Device dev)
    {
        var output = full_like(p.Q, double.NaN);
        double scale = 1 / Math.Sqrt(c.D);
        PagedAttentionKernel.Decode(p.Q, p.K, p.V, p.Tables, p.Lens, output, scale, c.Softcap, c.Window, c.KeysPerSplit);
        var expected = Reference(p.Q, p.K, p.V, p.Tables, p.Lens, scale, c.Softcap, c.Window);
        return RelMax(output, expected);
    }

    /// <summary>
    /// Random q and caches for a case (values from the global generator, on the device): each row gets ceil(len /
    /// blockSize) blocks taken in shuffled order from a pool with spare blocks; every cache slot no row owns is NaN and
    /// unused table entries name other rows' blocks, so a kernel that reads past a row's keys, or uses stale table
    /// entries, fails loudly.
    /// </summary>
    static Problem Build(Case c, Random rng, Device dev)
    {
        var lens = new int[c.N];
        for (int i = 0; i < c.N; i++)
            lens[i] = (i % 5) switch
            {
                1 => c.BlockSize * rng.Next(1, Math.Max(2, c.MaxLen / c.BlockSize)),     // exactly on a block boundary
                2 => rng.Next(1, 4),                                                    // the first tokens
                4 => c.BlockSize * rng.Next(1, Math.Max(2, c.MaxLen / c.BlockSize)) + 1, // one into a new block
                _ => rng.Next(1, c.MaxLen + 1),
            };
        int maxBlocks = lens.Max(l => (l + c.BlockSize - 1) / c.BlockSize) + 2;   // wider than needed: entries past the length
        int used = lens.Sum(l => (l + c.BlockSize - 1) / c.BlockSize), numBlocks = used + 5;
        var order = Enumerable.Range(0, numBlocks).OrderBy(_ => rng.Next()).ToArray();
        var table = new int[c.N * maxBlocks];
        var slots = new List<long>();
        int next = 0;
        for (int n = 0; n < c.N; n++)
        {
            int own = (lens[n] + c.BlockSize - 1) / c.BlockSize;
            for (int b = 0; b < maxBlocks; b++) table[n * maxBlocks + b] = b < own ? order[next++] : order[rng.Next(used)];
            for (int pos = 0; pos < lens[n]; pos++) slots.Add((long)table[n * maxBlocks + pos / c.BlockSize] * c.BlockSize + pos % c.BlockSize);
        }
        return CreateProblem(c, lens, table, maxBlocks, numBlocks, slots, dev);
    }

    static Problem CreateProblem(Case c, int[] lens, int[] table, int maxBlocks, int numBlocks, List<long> slots, Device dev)
    {
        long rows = (long)numBlocks * c.BlockSize;
        using var index = tensor(slots.ToArray(), device: dev);
        Tensor Cache()
        {
            // fp32 values rounded once to the dtype: the reference reads the same rounded values.
            using var filled = full([rows, c.KvH, c.D], double.NaN, ScalarType.Float32, dev);
            using var values = randn([slots.Count, c.KvH, c.D], ScalarType.Float32, dev);
            filled.index_copy_(0, index, values);
            return filled.reshape(numBlocks, c.BlockSize, c.KvH, c.D).to(c.Dtype).contiguous();
        }
        using var q32 = randn([c.N, c.H, c.D], ScalarType.Float32, dev) * c.QScale;
        var q = q32.to(c.Dtype).contiguous();
        return new Problem(q, Cache(), Cache(), tensor(table, ScalarType.Int32).reshape(c.N, maxBlocks).to(dev), tensor(lens, ScalarType.Int32).to(dev), lens);
    }

    /// <summary>
    /// The oracle: <see cref="PagedAttentionKernel.Decode(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, double, double, int)"/>'s
    /// contract in libtorch ops, row by row (lengths and tables read on the host), in fp64 from the inputs' values:
    /// gather the row's key and value slots through its block table, scores q·k·scale per query head against its kv head,
    /// the softcap, softmax over the attended keys, the weighted sum of values. Returns fp64 [N, H, D] on q's device; rows
    /// with no keys are zero. Works on the CPU too (the CPU tests check it against unpaged attention).
    /// </summary>
    public static Tensor Reference(Tensor q, Tensor kCache, Tensor vCache, Tensor blockTables, Tensor seqLens, double scale, double softcap, int window)
    {
        long n = q.shape[0], h = q.shape[1], d = q.shape[2];
        long blockSize = kCache.shape[1], kvh = kCache.shape[2], maxBlocks = blockTables.shape[1];
        using var lensHost = seqLens.cpu();
        using var tablesHost = blockTables.cpu();
        var lens = lensHost.data<int>().ToArray();
        var tables = tablesHost.data<int>().ToArray();
        using var kFlat = kCache.reshape(-1, kvh, d);
        using var vFlat = vCache.reshape(-1, kvh, d);
        var rows = new List<Tensor>();
        for (int i = 0; i < n; i++)
        {
            long len = Math.Clamp(lens[i], 0, maxBlocks * blockSize), start = window > 0 ? Math.Max(0, len - window) : 0;
            if (len == start) { rows.Add(zeros([h, d], ScalarType.Float64, q.device)); continue; }
            var slots = new long[len - start];
            for (long pos = start; pos < len; pos++) slots[pos - start] = tables[i * maxBlocks + pos / blockSize] * blockSize + pos % blockSize;
            using var index = tensor(slots, device: q.device);
            using var k = kFlat.index_select(0, index).to(ScalarType.Float64);            // [T, kvH, D]
            using var v = vFlat.index_select(0, index).to(ScalarType.Float64);
            using var qi = q[i].to(ScalarType.Float64).reshape(kvh, h / kvh, d);          // heads grouped by their kv head
            using var raw = einsum("kgd,tkd->kgt", qi, k) * scale;
            using var capped = softcap > 0 ? (raw / softcap).tanh() * softcap : raw.alias();
            using var probs = capped.softmax(-1);
            using var o = einsum("kgt,tkd->kgd", probs, v);
            rows.Add(o.reshape(h, d));
        }
        var result = stack(rows);
        foreach (var r in rows) r.Dispose();
        return result;
    }

    /// <summary>
    /// The kernel captured in a CUDA graph (one-pass and split-K), replayed three times after the seqLens and block tables
    /// are overwritten in place with new rows (the output NaN-filled before each replay): each replay must give the new
    /// problem's reference and exactly what an eager call gives (the kernel is deterministic).
    /// </summary>
    public static List<KernelChecks.Result> CudaGraphReplay(Device dev)
    {
        var results = new List<KernelChecks.Result>();
        using var stream = SideStream(dev);
        foreach (int keysPerSplit in new[] { 0, 256 })
        {
            using var scope = NewDisposeScope();
            var c = new Case(32, 32, 8, 64, 16, ScalarType.BFloat16, KeysPerSplit: keysPerSplit);
            const int MaxBlocks = 96, NumBlocks = 32 * 96;
            var rng = new Random(7 + keysPerSplit);
            using var q = randn([c.N, c.H, c.D], ScalarType.Float32, dev).to(c.Dtype);
            // Fixed shapes for every replay: a table of MaxBlocks entries per row over a cache of NumBlocks blocks.
            using var k = randn([NumBlocks, c.BlockSize, c.KvH, c.D], ScalarType.Float32, dev).to(c.Dtype);
            using var v = randn([NumBlocks, c.BlockSize, c.KvH, c.D], ScalarType.Float32, dev).to(c.Dtype);
            using var tables = zeros([c.N, MaxBlocks], ScalarType.Int32, dev);
            using var lens = ones([c.N], ScalarType.Int32, dev);
            using var output = empty_like(q);
            double scale = 1 / Math.Sqrt(c.D);
            void Call(Tensor o) => PagedAttentionKernel.Decode(q, k, v, tables, lens, o, scale, 0, 0, keysPerSplit);
            Call(output);                                   // compiles the kernel outside the capture
            using var graph = CudaGraph.Capture(() => Call(output));
            double worst = 0, eagerDiff = 0;
            for (int trial = 0; trial < 3; trial++)
            {
                using var trialScope = NewDisposeScope();
                var newLens = Enumerable.Range(0, c.N).Select(i => i % 4 == 1 ? c.BlockSize * rng.Next(1, MaxBlocks + 1) : rng.Next(1, MaxBlocks * c.BlockSize + 1)).ToArray();
                var newTables = Enumerable.Range(0, c.N * MaxBlocks).Select(_ => rng.Next(NumBlocks)).ToArray();
                lens.copy_(tensor(newLens, ScalarType.Int32));
                tables.copy_(tensor(newTables, ScalarType.Int32).reshape(c.N, MaxBlocks));
                output.fill_(double.NaN);
                graph.Replay();
                var replayed = output.cpu();
                var expected = Reference(q, k, v, tables, lens, scale, 0, 0);
                var eager = empty_like(output);
                Call(eager);
                worst = Math.Max(worst, RelMax(replayed, expected.cpu()));
                eagerDiff = Math.Max(eagerDiff, replayed.to(ScalarType.Float32).sub(eager.cpu().to(ScalarType.Float32)).abs().max().item<float>());
            }
            bool pass = worst <= Tolerance(c.Dtype) && eagerDiff == 0;
            results.Add(new(pass, $"paged attention in a CUDA graph ({(keysPerSplit == 0 ? "auto split" : $"split={keysPerSplit} keys")}), 3 replays after " +
                                  $"seqLens/blockTables changed in place: rel max err vs reference {worst:E2}, max |replay − eager| {eagerDiff:E2} (must be 0)"));
        }
        return results;
    }

    /// <summary>
    /// Timings (reported, not asserted; Pass only says the kernel ran): µs per call, from a CUDA graph of 20 calls replayed,
    /// and the effective K/V read rate, for the serving decode shape (N=32, H=32, kvH=8, D=64, 1,024 keys each, bf16,
    /// block size 16) with each split choice, and two few-sequences/long-context shapes where split-K matters; against the
    /// device's copy rate (a device-to-device copy, bytes read + written per second).
    /// </summary>
    public static List<KernelChecks.Result> Timing(Device dev)
    {
        var results = new List<KernelChecks.Result>();
        using var stream = SideStream(dev);
        double copyGbs = CopyRate(dev);
        results.Add(new(true, $"paged attention timing: device copy rate {copyGbs:F0} GB/s (read + written)"));
        foreach (var (n, len, splits) in new[] { (32, 1024, new[] { 0, -1, 512, 256 }), (32, 256, new[] { 0 }), (256, 512, new[] { 0 }),
                                                 (7, 4096, new[] { 0, -1, 1024 }), (1, 16384, new[] { 0, -1, 2048 }) })
            foreach (int split in splits)
                results.Add(Time(n, len, split, null, copyGbs, dev));
        // Launch shapes other than the default on the serving shape, to tune PagedAttentionKernel.Tuning.Default.
        foreach (var (warps, unroll) in new[] { (8, 4), (4, 8), (8, 8), (8, 2), (2, 4), (16, 4) })
            foreach (int split in new[] { -1, 512 })
                results.Add(Time(32, 1024, split, new(warps, unroll), copyGbs, dev));
        return results;
    }

    static KernelChecks.Result Time(int n, int len, int keysPerSplit, PagedAttentionKernel.Tuning? tuning, double copyGbs, Device dev)
    {
        using var scope = NewDisposeScope();
        const int H = 32, KvH = 8, D = 64, Bs = 16, Calls = 20, Replays = 10;
        int blocksPerRow = len / Bs;
        var k = randn([n * blocksPerRow, Bs, KvH, D], ScalarType.BFloat16, dev);
        var v = randn([n * blocksPerRow, Bs, KvH, D], ScalarType.BFloat16, dev);
        var q = randn([n, H, D], ScalarType.BFloat16, dev);
        var order = Enumerable.Range(0, n * blocksPerRow).OrderBy(i => (i * 7919) % (n * blocksPerRow)).ToArray();   // not in order
        var tables = tensor(order, ScalarType.Int32).reshape(n, blocksPerRow).to(dev);
        var lens = full([n], len, ScalarType.Int32, dev);
        var output = empty_like(q);
        double scale = 1 / Math.Sqrt(D);
        long launches = PagedAttentionKernel.Launches;
        void Call() => PagedAttentionKernel.Decode(q, k, v, tables, lens, output, scale, 0, 0, keysPerSplit, tuning);
        Call();
        using var graph = CudaGraph.Capture(() => { for (int i = 0; i < Calls; i++) Call(); });
        graph.Replay();
        cuda.synchronize(dev);
        var clock = Stopwatch.StartNew();
        for (int i = 0; i < Replays; i++) graph.Replay();
        cuda.synchronize(dev);
        double seconds = clock.Elapsed.TotalSeconds / (Calls * Replays);
        bool ran = PagedAttentionKernel.Launches - launches == 1 + Calls && !output.isnan().any().item<bool>();
        double bytes = 2.0 * n * len * KvH * D * 2;
        double gbs = bytes / seconds / 1e9;
        int auto = PagedAttentionKernel.AutoKeysPerSplit((long)n * KvH, blocksPerRow * Bs);
        string how = keysPerSplit switch { 0 => $"auto ({(auto == 0 ? "no split" : $"split={auto} keys")})", < 0 => "no split", _ => $"split={keysPerSplit} keys" };
        how += tuning is { } t ? $", {t}" : ", default launch";
        return new(ran, $"paged attention timing N={n} H={H} kvH={KvH} D={D} seqLen={len} bf16 bs={Bs}, {how}: {seconds * 1e6:F1} µs per call, " +
                        $"K/V read {gbs:F0} GB/s ({gbs / copyGbs:P0} of the copy rate)");
    }

    /// <summary>Device-to-device copy rate of a 256 MiB buffer, bytes read + written per second.</summary>
    static double CopyRate(Device dev)
    {
        using var scope = NewDisposeScope();
        var src = empty([128L << 20], ScalarType.BFloat16, dev);
        var dst = empty_like(src);
        dst.copy_(src);
        cuda.synchronize(dev);
        const int Iterations = 20;
        var clock = Stopwatch.StartNew();
        for (int i = 0; i < Iterations; i++) dst.copy_(src);
        cuda.synchronize(dev);
        return 2.0 * src.numel() * 2 * Iterations / clock.Elapsed.TotalSeconds / 1e9;
    }

    /// <summary>A side stream for capture, once a tensor operation has made the CUDA context current on this thread.</summary>
    static IDisposable SideStream(Device dev)
    {
        using (zeros(1, device: dev)) { }
        return CudaStreams.UseSideStream(dev);
    }

    static double RelMax(Tensor actual, Tensor expected)
    {
        using var a = actual.to(ScalarType.Float64, expected.device);
        using var b = expected.to(ScalarType.Float64);
        using var diff = (a - b).abs();
        if (diff.isnan().any().item<bool>()) return double.NaN;
        return diff.max().item<double>() / Math.Max(b.abs().max().item<double>(), 1e-12);
    }
}
