using LoraKit.Distributed;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// The NCCL binding on real GPUs: the wheel's libnccl.so.2 is found, the 128-byte unique id crosses P/Invoke by value,
/// the dtype codes and libtorch's stream are right. One GPU: a communicator of one rank (the sum is the tensor itself).
/// Two GPUs or more: two ranks as threads of this process, each with its own device current, sum each other's tensors.
/// </summary>
public class NcclCudaTests
{
    [CudaFact]
    public void OneRankCommunicatorAllReducesInPlace()
    {
        Assert.True(NcclComm.Version >= 21200, $"NCCL {NcclComm.Version}: 2.12 or newer expected");
        CudaDevice.MakeCurrent(0);
        using var comm = NcclComm.Init(1, NcclComm.NewUniqueId(), 0);
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float64 })
        {
            using var t = arange(1000, dtype: ScalarType.Float32, device: CUDA).to(dtype);
            using var expected = t.clone();
            comm.AllReduceSum(t);
            cuda.synchronize();
            Assert.True(t.eq(expected).all().item<bool>(), $"{dtype}");
        }
    }

    [CudaFact]
    public void TwoGpusSumEachOthersTensors()
    {
        if (CudaDevice.Count() < 2) return; // a single-GPU machine checks the binding above; this needs two devices
        var id = NcclComm.NewUniqueId();
        var sums = new float[2][];
        var errors = new Exception?[2];
        var threads = Enumerable.Range(0, 2).Select(r => new Thread(() =>
        {
            try
            {
                CudaDevice.MakeCurrent(r);
                using var comm = NcclComm.Init(2, id, r);
                using var t = full(4096, (float)(r + 1), device: new Device($"cuda:{r}"));
                comm.AllReduceSum(t);
                sums[r] = t.cpu().data<float>().ToArray();
            }
            catch (Exception e) { errors[r] = e; }
        })).ToList();
        threads.ForEach(t => t.Start());
        Assert.True(threads.All(t => t.Join(TimeSpan.FromSeconds(120))), "the two ranks did not finish (NCCL hang)");
        Assert.Null(errors[0]);
        Assert.Null(errors[1]);
        Assert.All(sums, s => Assert.All(s, v => Assert.Equal(3f, v)));
    }
}
