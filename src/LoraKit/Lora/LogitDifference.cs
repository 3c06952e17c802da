using System.Text.Json.Nodes;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// How far two models' logits are apart on one probe text, in fp32: the largest and the mean |Δlogit| over every position
/// and vocabulary entry, and the relative error max|Δ| / max|reference| (the measure LoraKit's reference tests use). What
/// <c>lorakit merge</c> prints so a user sees what a choice of merge base, or a re-quantization, costs.
/// </summary>
/// <param name="MaxAbs">max |a − b|.</param>
/// <param name="MeanAbs">mean |a − b|.</param>
/// <param name="Relative">max |a − b| / max |reference|.</param>
/// <param name="Reference">What the difference is relative to (a short description).</param>
public sealed record LogitDifference(double MaxAbs, double MeanAbs, double Relative, string Reference)
{
    /// <summary>The text probed when none is given: short, ordinary, the same on every run.</summary>
    public const string DefaultProbeText = "The quick brown fox jumps over the lazy dog. Merging an adapter should not change what it learned.";

    /// <summary>The difference of <paramref name="other"/> from <paramref name="reference"/> (same shape; computed in fp64).</summary>
    public static LogitDifference Of(Tensor reference, Tensor other, string referenceName)
    {
        using var scope = NewDisposeScope();
        if (!reference.shape.SequenceEqual(other.shape))
            throw new ArgumentException($"logits of shape [{string.Join(", ", reference.shape)}] and [{string.Join(", ", other.shape)}] cannot be compared");
        var r = reference.to(ScalarType.Float64);
        var d = (other.to(ScalarType.Float64) - r).abs();
        double max = d.max().item<double>(), scale = r.abs().max().item<double>();
        return new LogitDifference(max, d.mean().item<double>(), max / Math.Max(scale, 1e-12), referenceName);
    }

    /// <summary>The fp32 logits [T, vocab] of <paramref name="model"/> on the token ids (on the CPU, so models can be freed).</summary>
    public static Tensor Probe(CausalLM model, long[] ids)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var input = tensor(ids, ScalarType.Int64).unsqueeze(0).to(model.Device);
        return model.Logits(input, null, null)[0].to(ScalarType.Float32, CPU).MoveToOuterDisposeScope();
    }

    /// <summary>"max |Δlogit| 1.301, mean |Δlogit| 0.07868, relative 0.4856 (to …)".</summary>
    public override string ToString() =>
        FormattableString.Invariant($"max |Δlogit| {MaxAbs:G4}, mean |Δlogit| {MeanAbs:G4}, relative {Relative:G4} (to {Reference})");

    /// <summary>The JSON recorded in the merged config.json (full precision).</summary>
    public JsonObject ToJson() => new() { ["max_abs"] = MaxAbs, ["mean_abs"] = MeanAbs, ["relative"] = Relative, ["relative_to"] = Reference };
}
