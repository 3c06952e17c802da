using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Quantization;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>What a merge onto a quantized base did and measured (all logits fp32, on one probe text).</summary>
/// <param name="Plan">The merge base decided (<see cref="MergeBasePlan"/>).</param>
/// <param name="ProbeTokens">Tokens in the probe text.</param>
/// <param name="BaseChoice">The merge onto the other base vs this one; null when the other base's weights are not available.</param>
/// <param name="AdapterEffect">The merged model vs its base without the adapter (the scale the other numbers compare to).</param>
/// <param name="Requantization">The re-quantized output vs the merged model before re-quantization; null without re-quantization.</param>
public sealed record QuantizedMergeResult(MergeBasePlan Plan, int ProbeTokens, LogitDifference? BaseChoice, LogitDifference AdapterEffect,
    LogitDifference? Requantization);

/// <summary>
/// Merging an adapter when quantization is involved (see <see cref="MergeBasePlan"/> for the choice of base). The merge
/// base is built in fp32: a pre-quantized checkpoint loads dequantized; a full-precision base the adapter saw quantized
/// (its <c>lorakit_quantization</c> record) gets dequantize(quantize(W)) for exactly the weights <c>lorakit quantize</c> and
/// transformers quantize (<see cref="BnbCheckpointWriter.DefaultQuantizable"/>: decoder linears; lm_head, embeddings and
/// norms stay the original). The adapter is merged there in fp32 (B·A·scaling, the one delta every merge uses), the
/// result rounded once to the output dtype and written with a <c>lorakit_merge.quantization</c> record; with
/// <c>quantizeOutput</c> the merged weights are re-quantized into a bitsandbytes checkpoint instead.
/// <para>
/// Measurements: the logits of the merged model onto the other base (one model at a time: the other is built, probed
/// and freed first), of the base without the adapter, and — when re-quantizing — of the re-quantized model, each
/// compared with the written merge on the probe text. The probed weights are the written ones (rounded to the output
/// dtype, held in fp32), so the numbers are what loading the outputs in fp32 shows.
/// </para>
/// Cost: each model is held in fp32 on the device (4 bytes a parameter: ~32 GB for an 8B model), one at a time, plus
/// the written copy in the output dtype while writing (~16 GB in bf16); two or three loads and forward passes over the
/// probe text. A DIR checked against a pre-quantized base is re-quantized one tensor at a time.
/// </summary>
public static class QuantizedBaseMerge
{
    /// <summary>
    /// Merges by <paramref name="plan"/> and writes the checkpoint to the new or empty <paramref name="outDir"/> in
    /// <paramref name="outputDType"/> (or as a bitsandbytes checkpoint of it when <paramref name="quantizeOutput"/> is
    /// given); <paramref name="provenance"/> (the gate's record) gains a <c>quantization</c> entry and goes into
    /// config.json as <c>lorakit_merge</c>.
    /// </summary>
    public static QuantizedMergeResult Merge(MergeBasePlan plan, string outDir, ScalarType outputDType, Device device,
        BnbQuantizeOptions? quantizeOutput = null, string? probeText = null, JsonObject? provenance = null, Action<string>? warn = null)
    {
        OutputDirectory.EnsureNewOrEmpty(outDir);
        quantizeOutput?.Validate();
        if (outputDType is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16))
            throw new QuantizedMergeException($"merged checkpoints are written in float32, bfloat16 or float16, not {outputDType}");
        string text = probeText ?? LogitDifference.DefaultProbeText;
        var ids = Tokenizer.Load(plan.ModelDir).Encode(text).Select(i => (long)i).ToArray();
        if (ids.Length == 0) throw new QuantizedMergeException("the probe text has no tokens");

        var other = plan.Base == MergeBase.Dequantized ? MergeBase.Original : MergeBase.Dequantized;
        Tensor? otherLogits = null;
        if (plan.Quantized && (other == MergeBase.Dequantized || plan.OriginalDir is not null))
            using (var alt = Build(plan, other, device, outputDType, ids, null, out var altBase))
            {
                altBase.Dispose();
                otherLogits = LogitDifference.Probe(alt.Model, ids);
            }

        using var lm = Build(plan, plan.Base, device, outputDType, ids, warn, out var baseLogits);
        using var scope = NewDisposeScope();
        var logits = LogitDifference.Probe(lm.Model, ids);
        var adapterEffect = LogitDifference.Of(logits, baseLogits, "the merge");
        baseLogits.Dispose();
        LogitDifference? choice = otherLogits is null ? null
            : plan.Base == MergeBase.Dequantized ? LogitDifference.Of(logits, otherLogits, "the dequantized-base merge, written")
            : LogitDifference.Of(otherLogits, logits, "the dequantized-base merge, not written");
        otherLogits?.Dispose();

        foreach (var (name, p) in lm.Model.named_parameters())
            if (MergedCheckpoint.CheckpointKey(name) is string key) AdapterFiles.CheckFinite(p, key, $"merged model (not written to {outDir})", double.PositiveInfinity);
        var (config, tensors) = CheckpointWriter.Parts(lm.Model, checkpointKey: MergedCheckpoint.CheckpointKey, saveAs: outputDType);
        LogitDifference? requantization = null;
        if (quantizeOutput is not null)
        {
            tensors = BnbCheckpointWriter.QuantizeTensors(tensors, quantizeOutput); // before the weights below are replaced
            config["quantization_config"] = BnbCheckpointWriter.QuantizationConfig(quantizeOutput);
            ApplyRoundTrip(lm.Model, quantizeOutput);
            requantization = LogitDifference.Of(logits, LogitDifference.Probe(lm.Model, ids), "the merge before re-quantization");
        }
        var result = new QuantizedMergeResult(plan, ids.Length, choice, adapterEffect, requantization);
        var record = (provenance?.DeepClone() as JsonObject) ?? new JsonObject();
        record["quantization"] = Record(result, text, quantizeOutput);
        config[MergedCheckpoint.ProvenanceKey] = record;
        HfCheckpointWriter.Write(outDir, config, tensors, plan.ModelDir);
        return result;
    }

    /// <summary>
    /// The fp32 model of the adapter merged onto <paramref name="which"/> base, its weights rounded to
    /// <paramref name="outputDType"/>; <paramref name="baseLogits"/> are the base's before the adapter went in.
    /// </summary>
    static LoraModel Build(MergeBasePlan plan, MergeBase which, Device device, ScalarType outputDType, long[] ids, Action<string>? warn, out Tensor baseLogits)
    {
        string dir = which == MergeBase.Original ? plan.OriginalDir! : plan.ModelDir;
        var lm = new LoraModel(CausalLM.Load(dir, ScalarType.Float32, device, dequantize: true));
        try
        {
            // A full-precision base the adapter saw quantized on load: rebuild exactly those weights.
            if (which == MergeBase.Dequantized && plan.BaseQuantization is null && plan.TrainedOn is not null) ApplyRoundTrip(lm.Model, plan.TrainedOn);
            baseLogits = LogitDifference.Probe(lm.Model, ids);
            // The plan has checked the adapter against --model (and DIR against --model); DIR's own fingerprint differs by design.
            bool elsewhere = dir != plan.ModelDir;
            AdapterFiles.Load(lm, "default", plan.AdapterDir, new AdapterLoadOptions
            {
                AllowBaseMismatch = plan.AllowBaseMismatch || elsewhere, Warn = elsewhere || plan.AllowBaseMismatch ? null : warn,
            });
            lm.Merge("default");
            if (outputDType != ScalarType.Float32) RoundTo(lm.Model, outputDType);
            return lm;
        }
        catch { lm.Dispose(); throw; }
    }

    /// <summary>Replaces each quantizable base weight by dequantize(quantize(W)) (the weights a quantized model computes with).</summary>
    public static void ApplyRoundTrip(CausalLM model, BnbQuantizeOptions options)
    {
        using var _ = no_grad();
        foreach (var (name, p) in model.named_parameters())
        {
            if (MergedCheckpoint.CheckpointKey(name) is not string key || !BnbCheckpointWriter.DefaultQuantizable(key, p)) continue;
            using var scope = NewDisposeScope();
            p.copy_(RoundTrip(p, options));
        }
    }

    /// <summary>dequantize(quantize(<paramref name="w"/>)) in fp32, as bitsandbytes stores and dequantizes it.</summary>
    public static Tensor RoundTrip(Tensor w, BnbQuantizeOptions options)
    {
        if (options.Method == "int8")
        {
            using var q8 = Int8RowWise.Quantize(w);
            return Int8RowWise.Dequantize(q8);
        }
        using var q4 = Blockwise4Bit.Quantize(w, options.Method, options.Blocksize, options.DoubleQuant);
        return Blockwise4Bit.Dequantize(q4);
    }

    /// <summary>Rounds every base weight to <paramref name="dtype"/>'s precision in place (kept fp32): the values that will be written.</summary>
    static void RoundTo(CausalLM model, ScalarType dtype)
    {
        using var _ = no_grad();
        foreach (var (name, p) in model.named_parameters())
        {
            if (MergedCheckpoint.CheckpointKey(name) is null) continue;
            using var scope = NewDisposeScope();
            p.copy_(p.to(dtype).to(ScalarType.Float32));
        }
    }

    static JsonObject Record(QuantizedMergeResult r, string text, BnbQuantizeOptions? quantizeOutput)
    {
        var o = r.Plan.ToJson();
        o["output_quantization"] = quantizeOutput is null ? null : JsonNode.Parse(quantizeOutput.ToJson());
        o["probe"] = new JsonObject
        {
            ["text"] = text, ["tokens"] = r.ProbeTokens,
            ["merge_base_difference"] = r.BaseChoice?.ToJson(),
            ["adapter_effect"] = r.AdapterEffect.ToJson(),
            ["requantization_difference"] = r.Requantization?.ToJson(),
        };
        return o;
    }
}
