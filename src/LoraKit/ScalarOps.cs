// Tensor-with-number arithmetic whose TorchSharp.Scalar outlives the native call.
//
// Why: TorchSharp 0.107 turns a number into a finalizable native Scalar (implicitly: `x + 1e-6`, `x * 0.5`,
// `x.pow(2)`, `masked_fill(m, -inf)`, and the hidden alpha of every Tensor+Tensor `add`), reads its handle and
// calls libtorch with nothing keeping the Scalar reachable. A GC during that call lets the finalizer thread free
// the native Scalar while libtorch reads it: "Expected false to be true" in c10::Scalar::toFloat, "Unknown scalar
// type", wrong values or a crashed process, more often the busier the GC (ScalarLifetimeTests reproduces it).
// Every operation here holds its Scalar in a `using` (or a process-lifetime static) until the call has returned.
// Code that runs repeatedly (forwards, optimizer, sampling, serving) uses these instead of the operators; a
// constant used on a hot path can also be a `static readonly Scalar` field.
using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit;

/// <summary>Tensor–number operations that keep their <see cref="Scalar"/> alive across the native call.</summary>
internal static class ScalarOps
{
    /// <summary>1 for the process's life: the alpha of <c>add</c>, which TorchSharp would otherwise create per call.</summary>
    internal static readonly Scalar One = 1.ToScalar();

    /// <summary>a + b (Tensor + Tensor: TorchSharp's operator makes a temporary alpha Scalar).</summary>
    public static Tensor Plus(this Tensor a, Tensor b) => a.add(b, One);

    /// <summary>a + b·alpha.</summary>
    public static Tensor Plus(this Tensor a, Tensor b, double alpha)
    {
        using var s = alpha.ToScalar();
        return a.add(b, s);
    }

    /// <summary>a += b, in place.</summary>
    public static Tensor PlusInPlace(this Tensor a, Tensor b) => a.add_(b, One);

    /// <summary>a += b·alpha, in place.</summary>
    public static Tensor PlusInPlace(this Tensor a, Tensor b, double alpha)
    {
        using var s = alpha.ToScalar();
        return a.add_(b, s);
    }

    /// <summary>a + v, keeping an integer tensor integer.</summary>
    public static Tensor Plus(this Tensor a, long v)
    {
        using var s = v.ToScalar();
        return a.add(s, One);
    }

    /// <summary>a + v.</summary>
    public static Tensor Plus(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.add(s, One);
    }

    /// <summary>a − v, keeping an integer tensor integer.</summary>
    public static Tensor Minus(this Tensor a, long v)
    {
        using var s = v.ToScalar();
        return a.sub(s);
    }

    /// <summary>a − v.</summary>
    public static Tensor Minus(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.sub(s);
    }

    /// <summary>v − a.</summary>
    public static Tensor Subtract(double v, Tensor a)
    {
        using var s = v.ToScalar();
        using var negated = a.neg();
        return negated.add(s, One);
    }

    /// <summary>a · v, keeping an integer tensor integer.</summary>
    public static Tensor Times(this Tensor a, long v)
    {
        using var s = v.ToScalar();
        return a.mul(s);
    }

    /// <summary>a · v.</summary>
    public static Tensor Times(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.mul(s);
    }

    /// <summary>a ·= v, in place.</summary>
    public static Tensor TimesInPlace(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.mul_(s);
    }

    /// <summary>a / v (true division).</summary>
    public static Tensor DividedBy(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.div(s);
    }

    /// <summary>a /= v, in place.</summary>
    public static Tensor DividedByInPlace(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.div_(s);
    }

    /// <summary>a to the power e.</summary>
    public static Tensor Pow(this Tensor a, double e)
    {
        using var s = e.ToScalar();
        return a.pow(s);
    }

    /// <summary>max(a, min), elementwise.</summary>
    public static Tensor ClampMin(this Tensor a, double min)
    {
        using var s = min.ToScalar();
        return a.clamp_min(s);
    }

    /// <summary>max(a, min), elementwise, keeping an integer tensor integer.</summary>
    public static Tensor ClampMin(this Tensor a, long min)
    {
        using var s = min.ToScalar();
        return a.clamp_min(s);
    }

    /// <summary>a clamped to [min, max].</summary>
    public static Tensor Clamp(this Tensor a, double min, double max)
    {
        using var lo = min.ToScalar();
        using var hi = max.ToScalar();
        return a.clamp(lo, hi);
    }

    /// <summary>a with v where mask is true.</summary>
    public static Tensor MaskedFill(this Tensor a, Tensor mask, double v)
    {
        using var s = v.ToScalar();
        return a.masked_fill(mask, s);
    }

    /// <summary>a with v where mask is true, in place.</summary>
    public static Tensor MaskedFillInPlace(this Tensor a, Tensor mask, double v)
    {
        using var s = v.ToScalar();
        return a.masked_fill_(mask, s);
    }

    /// <summary>a += value · t1 · t2, in place.</summary>
    public static Tensor AddcmulInPlace(this Tensor a, Tensor t1, Tensor t2, double value)
    {
        using var s = value.ToScalar();
        return a.addcmul_(t1, t2, s);
    }

    /// <summary>a += value · t1 / t2, in place.</summary>
    public static Tensor AddcdivInPlace(this Tensor a, Tensor t1, Tensor t2, double value)
    {
        using var s = value.ToScalar();
        return a.addcdiv_(t1, t2, s);
    }

    /// <summary>a += v, in place.</summary>
    public static Tensor PlusInPlace(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.add_(s, One);
    }

    /// <summary>a to the integer power e (libtorch's integer-exponent paths, as <c>pow(2)</c> took).</summary>
    public static Tensor Pow(this Tensor a, long e)
    {
        using var s = e.ToScalar();
        return a.pow(s);
    }

    /// <summary>a with every element set to v, in place.</summary>
    public static Tensor FillInPlace(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.fill_(s);
    }

    /// <summary>A tensor shaped like <paramref name="like"/> holding v.</summary>
    public static Tensor FullLike(Tensor like, double v, ScalarType dtype)
    {
        using var s = v.ToScalar();
        return full_like(like, s, dtype);
    }

    /// <summary>a ≠ v, elementwise.</summary>
    public static Tensor NotEqual(this Tensor a, long v)
    {
        using var s = v.ToScalar();
        return a.ne(s);
    }

    /// <summary>a &lt; v, elementwise.</summary>
    public static Tensor LessThan(this Tensor a, long v)
    {
        using var s = v.ToScalar();
        return a.lt(s);
    }

    /// <summary>a ≤ v, elementwise.</summary>
    public static Tensor AtMost(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.le(s);
    }

    /// <summary>[start, stop) in steps of 1 (TorchSharp's two-argument <c>arange</c> makes its step Scalar per call).</summary>
    public static Tensor Range(long start, long stop, ScalarType dtype, Device? device)
    {
        using var from = start.ToScalar();
        using var to = stop.ToScalar();
        return arange(from, to, One, dtype, device);
    }

    /// <summary>[0, stop) as int64.</summary>
    public static Tensor Range(long stop, Device? device) => Range(0, stop, ScalarType.Int64, device);

    /// <summary>a &lt; v, elementwise.</summary>
    public static Tensor LessThan(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.lt(s);
    }

    /// <summary>a &gt; v, elementwise.</summary>
    public static Tensor GreaterThan(this Tensor a, double v)
    {
        using var s = v.ToScalar();
        return a.gt(s);
    }

    /// <summary>[start, stop) in steps of <paramref name="step"/>.</summary>
    public static Tensor Range(long start, long stop, long step, ScalarType dtype, Device? device = null)
    {
        using var from = start.ToScalar();
        using var to = stop.ToScalar();
        using var by = step.ToScalar();
        return arange(from, to, by, dtype, device);
    }
}
