using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>Boolean attention masks (true = may attend) combining causality, sliding windows and padding.</summary>
public static class AttentionMask
{
    /// <summary>
    /// Mask [B or 1, 1, T, past + T] for T new queries after <paramref name="past"/> cached positions, or null when plain
    /// causal attention is exact (no cache, no window, no padding), which lets SDPA pick its fastest kernel.
    /// </summary>
    public static Tensor? Build(long t, long past, int? window, Tensor? padding, Device device, Tensor? segments = null)
    {
        bool windowMatters = window is int w && past + t > w;
        if (padding is null && segments is null && past == 0 && !windowMatters) return null;
        using var scope = NewDisposeScope();
        long s = past + t;
        var q = ScalarOps.Range(past, s, ScalarType.Int64, device).unsqueeze(1);   // [T, 1] absolute query positions
        var k = ScalarOps.Range(0, s, ScalarType.Int64, device).unsqueeze(0);      // [1, S]
        var allowed = k <= q;
        if (window is int win) allowed = allowed.logical_and((q - k).LessThan(win));
        var mask = allowed.unsqueeze(0).unsqueeze(0);                    // [1, 1, T, S]
        if (padding is not null)
            mask = mask.logical_and(padding.to(ScalarType.Bool).unsqueeze(1).unsqueeze(1)); // [B, 1, T, S]
        if (segments is not null) // packed rows: a position sees only its own sample
            mask = mask.logical_and(segments.unsqueeze(2).eq(segments.unsqueeze(1)).unsqueeze(1));
        return mask.MoveToOuterDisposeScope();
    }
}
