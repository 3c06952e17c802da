using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// AdamW with PyTorch's arithmetic (decoupled weight decay, bias correction, eps outside the square root), written out
/// so its state is plain named tensors that checkpoints store in safetensors and restore bit-exactly.
/// (TorchSharp's own AdamW computes the same; its state does not round-trip through our checkpoint format.)
/// </summary>
public sealed class AdamW(IReadOnlyList<(string name, Parameter param)> parameters, double beta1, double beta2, double eps, double weightDecay) : IDisposable
{
    readonly Dictionary<string, (Tensor m, Tensor v)> _state = [];

    public long StepCount { get; private set; }
    public IReadOnlyList<(string name, Parameter param)> Parameters => parameters;

    public void Step(double lr)
    {
        using var _ = no_grad();
        StepCount++;
        double bc1 = 1 - Math.Pow(beta1, StepCount);
        double bc2Sqrt = Math.Sqrt(1 - Math.Pow(beta2, StepCount));
        foreach (var (name, p) in parameters)
        {
            if (p.grad is not Tensor g) continue;
            if (!_state.TryGetValue(name, out var s))
                _state[name] = s = (zeros_like(p).DetachFromDisposeScope(), zeros_like(p).DetachFromDisposeScope());
            if (weightDecay != 0) p.mul_(1 - lr * weightDecay);
            s.m.lerp_(g, 1 - beta1);
            s.v.mul_(beta2).addcmul_(g, g, 1 - beta2);
            using var denom = (s.v.sqrt() / bc2Sqrt).add_(eps);
            p.addcdiv_(s.m, denom, -lr / bc1);
        }
    }

    public void ZeroGrad()
    {
        foreach (var (_, p) in parameters) p.grad?.zero_();
    }

    /// <summary>State as named tensors (m and v per parameter) for checkpoints.</summary>
    public Dictionary<string, Tensor> State() =>
        _state.SelectMany(kv => new[] { ($"{kv.Key}.exp_avg", kv.Value.m), ($"{kv.Key}.exp_avg_sq", kv.Value.v) }).ToDictionary(x => x.Item1, x => x.Item2);

    public void Dispose()
    {
        foreach (var (m, v) in _state.Values) { m.Dispose(); v.Dispose(); }
        _state.Clear();
    }

    public void Restore(Func<string, Tensor?> read, long stepCount)
    {
        StepCount = stepCount;
        foreach (var (name, p) in parameters)
        {
            using var m = read($"{name}.exp_avg");
            using var v = read($"{name}.exp_avg_sq");
            if (m is null || v is null) continue;
            _state[name] = (m.to(p.dtype, p.device, copy: true).DetachFromDisposeScope(), v.to(p.dtype, p.device, copy: true).DetachFromDisposeScope());
        }
    }
}
