using System.Diagnostics;
using System.Runtime.InteropServices;
using LoraKit.Distributed;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Tests.Distributed;

/// <summary>The data-parallel layer's pieces on CPU: environment, store, data shards, gradient buckets, the CPU collectives.</summary>
public class DistributedUnitTests
{
    static Func<string, string?> Vars(params (string k, string v)[] vars) => k => vars.FirstOrDefault(x => x.k == k).v;

    [Fact]
    public void EnvironmentReadsTorchrunVariablesAndNamesTheBadOne()
    {
        Assert.Same(DistributedEnv.Single, DistributedEnv.Read(_ => null));
        var env = DistributedEnv.Read(Vars(("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")));
        Assert.Equal(new DistributedEnv(3, 8, 1, "node0", 29500), env);
        Assert.True(env.IsDistributed);
        Assert.False(env.IsLead);
        Assert.Equal(env, DistributedEnv.Read(k => env.ToVariables().GetValueOrDefault(k)));

        var missingPort = Assert.Throws<DistributedEnvException>(() => DistributedEnv.Read(Vars(("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"))));
        Assert.StartsWith("MASTER_PORT is not set", missingPort.Message);
        var rankTooLarge = Assert.Throws<DistributedEnvException>(() => DistributedEnv.Read(Vars(("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1"))));
        Assert.StartsWith("RANK=2:", rankTooLarge.Message);
        Assert.Same(DistributedEnv.Single, DistributedEnv.Read(Vars(("RANK", "5")))); // no WORLD_SIZE: not a group
        var noRank = Assert.Throws<DistributedEnvException>(() => DistributedEnv.Read(Vars(("WORLD_SIZE", "2"))));
        Assert.StartsWith("RANK is not set", noRank.Message);
        Assert.DoesNotContain('\n', noRank.Message);
        var badWorld = Assert.Throws<DistributedEnvException>(() => DistributedEnv.Read(Vars(("WORLD_SIZE", "two"))));
        Assert.StartsWith("WORLD_SIZE=two:", badWorld.Message);
    }

    [Fact]
    public void StoreServesSetGetAddAndBarrierAcrossRanks()
    {
        const int n = 4;
        using var lead = TcpStore.Connect("127.0.0.1", 0, TimeSpan.FromSeconds(10), serve: true);
        int port = lead.ServedPort;
        var got = new string[n];
        InProcessGroup.Run(n, r =>
        {
            using var store = r == 0 ? null : TcpStore.Connect("127.0.0.1", port, TimeSpan.FromSeconds(10));
            var s = store ?? lead;
            s.Set($"hello/{r}", System.Text.Encoding.UTF8.GetBytes($"rank {r}"));
            s.Barrier("all-set", n);
            got[r] = string.Join(",", Enumerable.Range(0, n).Select(k => System.Text.Encoding.UTF8.GetString(s.Get($"hello/{k}"))));
            s.Add("counter", r + 1);
            s.Barrier("counted", n);
            Assert.Equal((long)(n * (n + 1) / 2), s.Add("counter", 0));
        });
        Assert.All(got, g => Assert.Equal("rank 0,rank 1,rank 2,rank 3", g));

        // A value set for N readers is gone after the N-th read.
        lead.Set("once", [7], readers: 2);
        Assert.Equal([7], lead.Get("once"));
        Assert.Equal([7], lead.Get("once"));
        Assert.Throws<DistributedEnvException>(() => lead.Get("once", TimeSpan.FromMilliseconds(50)));
        Assert.Throws<ArgumentException>(() => lead.Set("huge", new byte[TcpStore.MaxFrameBytes]));
    }

    [Fact]
    public void ARankThatNeverArrivesIsATimeoutNotAHang()
    {
        using var lead = TcpStore.Connect("127.0.0.1", 0, TimeSpan.FromSeconds(10), serve: true);
        using var other = TcpStore.Connect("127.0.0.1", lead.ServedPort, TimeSpan.FromSeconds(10));
        var clock = Stopwatch.StartNew();
        DistributedEnvException? e0 = null, e1 = null;
        InProcessGroup.Run(2, r =>
        {
            // Three ranks expected, two arrive.
            try { (r == 0 ? lead : other).Barrier("join", 3, TimeSpan.FromSeconds(1)); }
            catch (DistributedEnvException e) { if (r == 0) e0 = e; else e1 = e; }
        });
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(15), $"took {clock.Elapsed}");
        Assert.NotNull(e0);
        Assert.NotNull(e1);
        Assert.StartsWith("barrier 'join': 2 of 3 ranks arrived within 1 s", e0!.Message);

        // Nobody serving: connecting gives up at its deadline with a line naming the address.
        int closed = GroupLauncher.FreePort();
        var noStore = Assert.Throws<DistributedEnvException>(() => TcpStore.Connect("127.0.0.1", closed, TimeSpan.FromMilliseconds(300)));
        Assert.Contains($"127.0.0.1:{closed}", noStore.Message);
        Assert.Contains("is rank 0 running?", noStore.Message);
    }

    [Fact]
    public void StoreCollectivesSumIdenticallyOnEveryRank()
    {
        const int n = 3;
        using var lead = TcpStore.Connect("127.0.0.1", 0, TimeSpan.FromSeconds(10), serve: true);
        var results = new float[n][];
        InProcessGroup.Run(n, r =>
        {
            using var own = r == 0 ? null : TcpStore.Connect("127.0.0.1", lead.ServedPort, TimeSpan.FromSeconds(10));
            var group = new StoreCollectives(own ?? lead, r, n, TimeSpan.FromSeconds(10));
            using var t = arange(6, dtype: ScalarType.Float32).reshape(2, 3) * (r + 1) + 1;
            group.AllReduceSum(t);
            group.AllReduceSum(t); // a second call must not see the first one's values
            results[r] = t.data<float>().ToArray();
        });
        // Element i: Σ_r (i·(r+1) + 1) = 6i + 3 after the first call, three times that after the second.
        Assert.Equal(Enumerable.Range(0, 6).Select(i => (float)(3 * (6 * i + 3))), results[0]);
        Assert.Equal(results[0], results[1]);
        Assert.Equal(results[0], results[2]);
    }

    [Theory]
    [InlineData(1, 4, 1)]
    [InlineData(2, 2, 1)]
    [InlineData(4, 1, 3)]
    [InlineData(3, 2, 2)]
    public void ShardsAreDisjointAndTogetherTheOneProcessBatch(int world, int batch, int accum)
    {
        var single = DataShard.Single(batch * world, accum);
        var shards = Enumerable.Range(0, world).Select(r => new DataShard(r, world, batch, accum)).ToList();
        Assert.All(shards, s => Assert.Equal(single.SamplesPerStep, s.SamplesPerStep));
        for (long position = 0; position < 3 * single.SamplesPerStep; position += single.SamplesPerStep)
        {
            var one = single.Positions(position).ToList();
            var mine = shards.Select(s => s.Positions(position).ToList()).ToList();
            for (int micro = 0; micro < accum; micro++)
            {
                // Micro-batch i of the one process = the ranks' micro-batches i, in rank order.
                Assert.Equal(one[micro], mine.SelectMany(m => m[micro]).ToArray());
            }
            var all = mine.SelectMany(m => m.SelectMany(x => x)).ToList();
            Assert.Equal(all.Count, all.Distinct().Count());
            Assert.Equal(shards[world - 1].Positions(position).ToList()[0], shards[world - 1].Positions(position).ToList()[0]); // a function of its inputs
        }
    }

    static List<(string name, Parameter param)> Params(params (string name, long[] shape, ScalarType dtype)[] specs) =>
        specs.Select(s => (s.name, new Parameter(randn(s.shape).to(s.dtype)))).ToList();

    [Fact]
    public void BucketsFollowReverseRegistrationOrderWithinTheCap()
    {
        // 4-byte floats: caps of 100 bytes hold 25 values; a larger tensor gets a bucket of its own; dtypes never mix.
        var ps = Params(("a", [10], ScalarType.Float32), ("b", [10], ScalarType.Float32), ("c", [3, 2], ScalarType.BFloat16),
            ("d", [30], ScalarType.Float32), ("e", [5], ScalarType.Float32), ("f", [8], ScalarType.Float32));
        using var buckets = new GradientBuckets(ps, capBytes: 100);
        var layout = buckets.Buckets.Select(b => string.Join(" ", b.Slots.Select(s => $"{ps[s.Parameter].name}@{s.Offset}"))).ToList();
        Assert.Equal(["f@0 e@8", "d@0", "c@0", "b@0 a@10"], layout);
        Assert.Equal(ScalarType.BFloat16, buckets.Buckets[2].DType);
        Assert.All(buckets.Buckets.Where(b => b.Slots.Count > 1), b => Assert.True(b.Bytes <= 100));
        Assert.Equal(new GradientBuckets.Slot(1, 3, 0, 10), buckets.SlotOf(1));

        // A bucket is handed back exactly when its last parameter becomes ready, in any order.
        buckets.Reset();
        Assert.Null(buckets.MarkReady(0));        // a: b@0 a@10 still waits for b
        Assert.Same(buckets.Buckets[1], buckets.MarkReady(3)); // d alone
        Assert.Null(buckets.MarkReady(4));
        Assert.Same(buckets.Buckets[0], buckets.MarkReady(5));
        Assert.Same(buckets.Buckets[3], buckets.MarkReady(1));
        Assert.Throws<InvalidOperationException>(() => buckets.MarkReady(1));

        // Default cap: everything of one dtype in one bucket.
        using var big = new GradientBuckets(ps);
        Assert.Equal(2, big.Buckets.Count);
    }

    [Fact]
    public void BucketsAllReduceGradientsAcrossReplicas()
    {
        const int n = 3;
        var group = new InProcessGroup(n);
        var replicas = Enumerable.Range(0, n).Select(_ => Params(("a", [4, 3], ScalarType.Float32), ("b", [7], ScalarType.Float32), ("c", [2, 2], ScalarType.Float32))).ToList();
        for (int r = 0; r < n; r++)
            foreach (var (i, p) in replicas[r].Select((p, i) => (i, p.param)))
                p.grad = full(p.shape, (float)(10 * r + i + 1));
        InProcessGroup.Run(n, r =>
        {
            using var buckets = new GradientBuckets(replicas[r], capBytes: 60);
            buckets.ReduceAll(group.Member(r).AllReduceSum);
        });
        Assert.Equal(2, group.Calls); // 60 bytes hold 15 floats: c and b (4 + 7) in one bucket, a (12) in the next
        for (int r = 0; r < n; r++)
            foreach (var (i, p) in replicas[r].Select((p, i) => (i, p.param)))
                Assert.True(p.grad!.eq(Enumerable.Range(0, n).Sum(k => 10 * k + i + 1)).all().item<bool>(), $"rank {r} parameter {i}");
    }

    [Fact]
    public void MissingNcclIsOneLine()
    {
        // On a machine without NCCL (CI) the library search must end in one line naming where it looked.
        if (NativeLibrary.TryLoad("libnccl.so.2", out var h)) { NativeLibrary.Free(h); return; }
        var e = Assert.Throws<NcclMissingException>(() => NcclComm.NewUniqueId());
        Assert.StartsWith("libnccl.so.2 not found", e.Message);
        Assert.Contains("LORAKIT_NCCL_LIB", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }
}
