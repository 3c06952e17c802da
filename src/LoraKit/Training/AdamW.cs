using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// AdamW with PyTorch's arithmetic (decoupled weight decay, bias correction, eps outside the square root), written out
/// so its state is plain named tensors that checkpoints store in safetensors and restore bit-exactly.
/// (TorchSharp's own AdamW computes the same; its state does not round-trip through our checkpoint format.)
/// <para>
/// Multi-tensor by construction: the parameters (per dtype and device) are moved into one flat buffer, their grads are
/// views of one flat grad buffer that backward accumulates into, and a step is a handful of kernels on the flat buffers
/// instead of several per parameter (LoRA on every linear layer of a 16-layer model has 224 tensors; launching their
/// updates one by one kept the GPU idle). Every parameter is updated each step, with a zero grad where backward gave none.
/// </para>
/// </summary>
public sealed class AdamW : IDisposable
{
    sealed record Member(string Name, Parameter Param, long Offset, long Count);

    /// <summary>One flat buffer of parameters sharing a dtype and device, with its grads and moments.</summary>
    sealed class Group(Tensor values, Tensor grads, List<Member> members) : IDisposable
    {
        public Tensor Values { get; } = values;
        public Tensor Grads { get; } = grads;
        public Tensor M { get; } = zeros_like(values).DetachFromDisposeScope();
        public Tensor V { get; } = zeros_like(values).DetachFromDisposeScope();
        public List<Member> Members { get; } = members;
        public void Dispose() { Values.Dispose(); Grads.Dispose(); M.Dispose(); V.Dispose(); }
    }

    readonly List<Group> _groups = [];
    readonly double _beta1, _beta2, _eps, _weightDecay;

    public AdamW(IReadOnlyList<(string name, Parameter param)> parameters, double beta1, double beta2, double eps, double weightDecay)
    {
        (_beta1, _beta2, _eps, _weightDecay) = (beta1, beta2, eps, weightDecay);
        Parameters = parameters;
        using var _ = no_grad();
        foreach (var g in parameters.GroupBy(p => (p.param.dtype, p.param.device.ToString())))
            _groups.Add(Flatten(g.ToList()));
    }

    /// <summary>Points every parameter at a slice of a new flat buffer (values copied) and its grad at a slice of a zeroed one.</summary>
    static Group Flatten(List<(string name, Parameter param)> ps)
    {
        using var scope = NewDisposeScope();
        var first = ps[0].param;
        long total = ps.Sum(p => p.param.numel());
        var values = empty(total, first.dtype, first.device);
        var grads = zeros(total, first.dtype, first.device);
        var members = new List<Member>();
        long offset = 0;
        foreach (var (name, p) in ps)
        {
            long n = p.numel();
            var slice = values.narrow(0, offset, n).view(p.shape);
            slice.copy_(p);
            p.set_(slice);
            p.grad = grads.narrow(0, offset, n).view(p.shape);
            members.Add(new Member(name, p, offset, n));
            offset += n;
        }
        return new Group(values.DetachFromDisposeScope(), grads.DetachFromDisposeScope(), members);
    }

    public long StepCount { get; private set; }
    public IReadOnlyList<(string name, Parameter param)> Parameters { get; }

    public void Step(double lr)
    {
        using var _ = no_grad();
        StepCount++;
        double bc1 = 1 - Math.Pow(_beta1, StepCount);
        double bc2Sqrt = Math.Sqrt(1 - Math.Pow(_beta2, StepCount));
        foreach (var g in _groups)
        {
            if (_weightDecay != 0) g.Values.TimesInPlace(1 - lr * _weightDecay);
            using Tensor weight = 1 - _beta1; // held: an implicit tensor outside a dispose scope could be finalized mid-call
            g.M.lerp_(g.Grads, weight);
            g.V.TimesInPlace(_beta2).AddcmulInPlace(g.Grads, g.Grads, 1 - _beta2);
            using var denom = g.V.sqrt().DividedByInPlace(bc2Sqrt).PlusInPlace(_eps);
            g.Values.AddcdivInPlace(g.M, denom, -lr / bc1);
        }
    }

    public void ZeroGrad()
    {
        foreach (var g in _groups) g.Grads.zero_();
    }

    /// <summary>Total L2 norm of all grads (fp32); when <paramref name="maxNorm"/> &gt; 0 they are scaled down to it (clip_grad_norm_).</summary>
    public double ClipGradNorm(double maxNorm)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        if (_groups.Count == 0) return 0;
        var total = stack(_groups.Select(g => g.Grads.to(ScalarType.Float32).norm()).ToArray()).norm();
        double norm = total.item<float>(); // the step's one synchronisation: the logged norm and the clip decision need it
        double coef = maxNorm / (norm + 1e-6);
        if (maxNorm > 0 && coef < 1) foreach (var g in _groups) g.Grads.TimesInPlace(coef);
        return norm;
    }

    /// <summary>State as named tensors (m and v per parameter, views into the flat buffers) for checkpoints.</summary>
    public Dictionary<string, Tensor> State()
    {
        var state = new Dictionary<string, Tensor>();
        if (StepCount == 0) return state;
        foreach (var g in _groups)
            foreach (var m in g.Members)
            {
                state[$"{m.Name}.exp_avg"] = g.M.narrow(0, m.Offset, m.Count).view(m.Param.shape);
                state[$"{m.Name}.exp_avg_sq"] = g.V.narrow(0, m.Offset, m.Count).view(m.Param.shape);
            }
        return state;
    }

    public void Restore(Func<string, Tensor?> read, long stepCount)
    {
        using var _ = no_grad();
        StepCount = stepCount;
        foreach (var g in _groups)
            foreach (var m in g.Members)
            {
                using var saved = read($"{m.Name}.exp_avg");
                using var savedSq = read($"{m.Name}.exp_avg_sq");
                if (saved is null || savedSq is null) continue;
                using var mv = g.M.narrow(0, m.Offset, m.Count);
                using var vv = g.V.narrow(0, m.Offset, m.Count);
                mv.copy_(saved.reshape(-1));
                vv.copy_(savedSq.reshape(-1));
            }
    }

    public void Dispose()
    {
        foreach (var g in _groups) g.Dispose();
        _groups.Clear();
    }
}
