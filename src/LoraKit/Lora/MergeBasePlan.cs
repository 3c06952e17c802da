using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Quantization;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>Which weights an adapter trained on a quantized base is merged into.</summary>
public enum MergeBase
{
    /// <summary>The dequantized quantized base: the weights the adapter was trained against (the default).</summary>
    Dequantized,
    /// <summary>The full-precision original weights (the quantization error of the base stays out, but the adapter never saw them).</summary>
    Original,
}

/// <summary>
/// What a merge onto a (possibly) quantized base will do, decided from the files before any model is loaded — so that
/// the QLoRA merge pitfall (peft#2105, transformers#31293: an adapter trained on NF4 weights merged into the bf16
/// original, bringing the quantization error back) cannot happen silently.
/// <para>
/// Evidence that an adapter was trained on quantized weights: its <c>lorakit_quantization</c> metadata record
/// (<see cref="BnbQuantizeOptions.AdapterMetadataKey"/>), or its base fingerprint being that of the pre-quantized
/// checkpoint it is merged onto. With that evidence the default is <see cref="MergeBase.Dequantized"/>; the full-precision
/// weights (the base itself, or DIR for a pre-quantized base) are the alternative and the comparison. An adapter with no
/// such evidence on a pre-quantized base is refused unless the merge base is chosen explicitly: it may be a PEFT QLoRA
/// adapter (trained on this quantized base: dequantized is right) or one trained on full precision (the base's
/// quantization error would land in the merged weights) — the files cannot tell, so the user must.
/// </para>
/// A DIR given as the full-precision original of a pre-quantized base is checked to have the same architecture and
/// shapes, then verified by re-quantizing it with the base's own quantization (deterministic): it must reproduce the
/// base's codes and unquantized tensors, or the merge is refused (unless base mismatches are allowed).
/// </summary>
public sealed record MergeBasePlan
{
    /// <summary>The base checkpoint given (full precision, or a pre-quantized bitsandbytes checkpoint).</summary>
    public required string ModelDir { get; init; }
    /// <summary>The adapter directory.</summary>
    public required string AdapterDir { get; init; }
    /// <summary>The quantization the adapter was trained against; null: full-precision weights (or unknown).</summary>
    public BnbQuantizeOptions? TrainedOn { get; init; }
    /// <summary>Where <see cref="TrainedOn"/> comes from, for the record.</summary>
    public string? TrainedOnSource { get; init; }
    /// <summary>How <see cref="ModelDir"/> stores its weights; null when it is full precision.</summary>
    public BnbQuantizeOptions? BaseQuantization { get; init; }
    /// <summary>The merge base chosen.</summary>
    public MergeBase Base { get; init; }
    /// <summary>Whether <see cref="Base"/> was chosen by the user (not the default).</summary>
    public bool Chosen { get; init; }
    /// <summary>The full-precision weights: the merge target (<see cref="MergeBase.Original"/>) or the comparison; null when not available.</summary>
    public string? OriginalDir { get; init; }
    /// <summary>How <see cref="OriginalDir"/> is known to be the source of the base.</summary>
    public string? OriginalCheck { get; init; }
    /// <summary>Load the adapter onto a base with another fingerprint (warned).</summary>
    public bool AllowBaseMismatch { get; init; }

    /// <summary>Whether quantization is involved at all (otherwise the plain merge applies).</summary>
    public bool Quantized => TrainedOn is not null || BaseQuantization is not null;

    /// <summary>The plan as config.json's <c>lorakit_merge</c> records it.</summary>
    public JsonObject ToJson() => new()
    {
        ["trained_on_quantization"] = TrainedOn is null ? null : JsonNode.Parse(TrainedOn.ToJson()),
        ["trained_on_quantization_source"] = TrainedOnSource,
        ["base_quantization"] = BaseQuantization is null ? null : JsonNode.Parse(BaseQuantization.ToJson()),
        ["merge_base"] = !Quantized ? "base" : Base == MergeBase.Dequantized ? "dequantized" : "original", // "base": no quantization involved
        ["merge_base_chosen_by"] = Chosen ? "user" : "default",
        ["original_weights"] = OriginalDir is null ? null : Path.GetFullPath(OriginalDir),
        ["original_weights_check"] = OriginalCheck,
    };

    /// <summary>Fraction of codes that may differ for DIR to still count as the source (another quantizer's rounding at exact ties).</summary>
    public const double SourceTolerance = 1e-3;

    /// <summary>
    /// Decides the merge base. <paramref name="requested"/> null takes the default; <paramref name="originalDir"/> is where
    /// the full-precision weights live (required for <see cref="MergeBase.Original"/> on a pre-quantized base, optional
    /// otherwise: then it is the comparison). Every refusal is a one-line <see cref="LoraKitException"/>.
    /// </summary>
    public static MergeBasePlan Make(string modelDir, string adapterDir, MergeBase? requested, string? originalDir,
        bool allowBaseMismatch, Action<string>? warn)
    {
        var (record, adapterFp) = ReadAdapter(adapterDir);
        var baseQ = CheckpointQuantization(modelDir);
        if (record is null && baseQ is null)
        {
            // No quantization anywhere: the plain merge (its own base checks) applies.
            if (requested is not null || originalDir is not null)
                throw new QuantizedMergeException($"--merge-base applies to adapters trained on a quantized base; {adapterDir} records none ({BnbQuantizeOptions.AdapterMetadataKey}) and {modelDir} is full precision");
            return new MergeBasePlan { ModelDir = modelDir, AdapterDir = adapterDir, AllowBaseMismatch = allowBaseMismatch };
        }
        string baseFp = BaseFingerprint.Of(modelDir);
        bool sameBase = adapterFp is not null && string.Equals(adapterFp, baseFp, StringComparison.OrdinalIgnoreCase);
        if (adapterFp is not null && !sameBase)
        {
            string message = $"{adapterDir}: adapter was trained on another base (fingerprint {BaseFingerprint.Short(adapterFp)}), not {modelDir} " +
                $"(fingerprint {BaseFingerprint.Short(baseFp)})" + (record is null ? "" :
                $"; it was trained on a {record.Method}-quantized base: give --model the checkpoint it was trained on (the full-precision original it quantized on load, or the pre-quantized checkpoint)");
            if (!allowBaseMismatch) throw new AdapterBaseMismatchException(message);
            warn?.Invoke($"{message} (merging anyway, as asked)");
        }
        var plan = new MergeBasePlan { ModelDir = modelDir, AdapterDir = adapterDir, BaseQuantization = baseQ, AllowBaseMismatch = allowBaseMismatch };
        if (record is not null) plan = plan with { TrainedOn = record, TrainedOnSource = $"adapter metadata ({BnbQuantizeOptions.AdapterMetadataKey})" };
        else if (baseQ is not null && sameBase) plan = plan with { TrainedOn = baseQ, TrainedOnSource = "the adapter's base fingerprint is this pre-quantized checkpoint" };
        if (record is not null && baseQ is not null && !SameStorage(record, baseQ))
            warn?.Invoke($"{adapterDir} records training on {Describe(record)} but {modelDir} is stored as {Describe(baseQ)}; merging onto the checkpoint's own dequantized weights");

        if (plan.TrainedOn is null)
        {
            if (requested is null)
                throw new QuantizedMergeException($"{modelDir} is a pre-quantized {Describe(baseQ!)} checkpoint but {adapterDir} records no quantized training base: " +
                    "if it was trained on full-precision weights, merging here puts the base's quantization error into the merged model; choose " +
                    "--merge-base dequantized (it was trained on this quantized base, e.g. a PEFT QLoRA adapter) or --merge-base original DIR (the full-precision weights)");
            if (requested == MergeBase.Dequantized)
                warn?.Invoke($"merging {adapterDir}, which records no quantized training base, into the DEQUANTIZED {Describe(baseQ!)} weights of {modelDir}, as asked: " +
                             "right for an adapter trained on this quantized base; if it was trained on full precision, the base's quantization error is now in the merged weights");
        }
        plan = plan with { Base = requested ?? MergeBase.Dequantized, Chosen = requested is not null };
        return baseQ is null ? plan.WithFullPrecisionBase(originalDir) : plan.WithOriginalOfQuantizedBase(originalDir);
    }

    /// <summary>A full-precision base is its own original; a DIR besides it must be the same checkpoint.</summary>
    MergeBasePlan WithFullPrecisionBase(string? originalDir)
    {
        if (originalDir is not null && !string.Equals(BaseFingerprint.Of(originalDir), BaseFingerprint.Of(ModelDir), StringComparison.OrdinalIgnoreCase))
            throw new QuantizedMergeException($"{ModelDir} is already the full-precision original the adapter's quantized base was made from; {originalDir} is another checkpoint (its fingerprint differs): leave DIR out");
        return this with { OriginalDir = ModelDir, OriginalCheck = "the base itself (full precision)" };
    }

    /// <summary>The full-precision original of a pre-quantized base: needed to merge into it, optional for the comparison; verified when given.</summary>
    MergeBasePlan WithOriginalOfQuantizedBase(string? originalDir)
    {
        if (originalDir is null)
        {
            if (Base == MergeBase.Original)
                throw new QuantizedMergeException($"--merge-base original needs DIR, the full-precision weights of the pre-quantized {ModelDir} (--merge-base original DIR)");
            return this;
        }
        ModelDirectory.Require(originalDir);
        if (CheckpointQuantization(originalDir) is { } q)
            throw new QuantizedMergeException($"{originalDir} is itself a quantized ({Describe(q)}) checkpoint, not full-precision weights");
        var (codes, codesTotal, others, othersTotal) = VerifySource(ModelDir, originalDir);
        long bad = codes + others, total = codesTotal + othersTotal;
        string check = bad == 0
            ? $"verified: re-quantizing it reproduces all {codesTotal:N0} quantized codes and {othersTotal:N0} unquantized values of {ModelDir}"
            : $"{codes:N0} of {codesTotal:N0} quantized codes and {others:N0} of {othersTotal:N0} unquantized values differ from {ModelDir}'s";
        if (bad > 0 && bad > SourceTolerance * total)
        {
            string message = $"{originalDir} is not the full-precision source of {ModelDir}: re-quantized, {check}";
            if (!AllowBaseMismatch) throw new QuantizedMergeException($"{message} (--allow-base-mismatch to use it anyway)");
            return this with { OriginalDir = originalDir, OriginalCheck = $"NOT the source (allowed): {check}" };
        }
        if (bad > 0) check = $"consistent (another quantizer's rounding?): {check}";
        return this with { OriginalDir = originalDir, OriginalCheck = check };
    }

    /// <summary>The adapter's quantization record and base fingerprint (either may be absent).</summary>
    public static (BnbQuantizeOptions? record, string? fingerprint) ReadAdapter(string adapterDir)
    {
        var path = Path.Combine(adapterDir, AdapterFiles.WeightsFile);
        if (!File.Exists(path)) throw new LoraKitException($"{adapterDir}: {AdapterFiles.WeightsFile} not found");
        using var file = SafetensorsFile.Open(path);
        var record = file.Metadata.TryGetValue(BnbQuantizeOptions.AdapterMetadataKey, out var json) ? BnbQuantizeOptions.FromJson(json, path) : null;
        return (record, file.Metadata.GetValueOrDefault(BaseFingerprint.MetadataKey));
    }

    /// <summary>How a checkpoint's weights are quantized (from its first quantized weight; compute dtype from config.json), or null.</summary>
    public static BnbQuantizeOptions? CheckpointQuantization(string modelDir)
    {
        using var files = CheckpointFiles.Open(modelDir);
        var quantized = BnbCheckpoint.QuantizedWeights(files);
        if (quantized.Count == 0) return null;
        string compute = ModelConfig.Load(modelDir).Raw["quantization_config"]?["bnb_4bit_compute_dtype"]?.GetValue<string>() ?? "bfloat16";
        if (compute is not ("bfloat16" or "float16" or "float32")) compute = "bfloat16";
        if (BnbCheckpoint.KindOf(files, quantized[0]) == BnbKind.Int8) return new BnbQuantizeOptions("int8", false, 64, compute);
        using var q = BnbCheckpoint.Read4Bit(files, quantized[0]);
        return new BnbQuantizeOptions(q.State.quant_type, q.State.Nested, q.State.blocksize, compute);
    }

    /// <summary>"nf4 (blocksize 64, double quant)".</summary>
    public static string Describe(BnbQuantizeOptions o) =>
        o.Method == "int8" ? "int8" : $"{o.Method} (blocksize {o.Blocksize}{(o.DoubleQuant ? ", double quant" : "")})";

    static bool SameStorage(BnbQuantizeOptions a, BnbQuantizeOptions b) =>
        a.Method == b.Method && (a.Method == "int8" || (a.Blocksize == b.Blocksize && a.DoubleQuant == b.DoubleQuant));

    /// <summary>
    /// Checks <paramref name="dir"/> has <paramref name="quantizedDir"/>'s architecture and every tensor with its shape, then
    /// re-quantizes each quantized weight of it as the checkpoint's quant state says and counts the codes that differ, and
    /// the unquantized values that differ once rounded to the checkpoint's stored dtype. Reads one tensor at a time.
    /// </summary>
    static (long codes, long codesTotal, long others, long othersTotal) VerifySource(string quantizedDir, string dir)
    {
        string ours = Essentials(ModelConfig.Load(quantizedDir)), theirs = Essentials(ModelConfig.Load(dir));
        if (ours != theirs) throw new QuantizedMergeException($"{dir} is not the same architecture as {quantizedDir}: {theirs} vs {ours}");
        using var q = CheckpointFiles.Open(quantizedDir);
        using var o = CheckpointFiles.Open(dir);
        var quantized = BnbCheckpoint.QuantizedWeights(q);
        var companions = quantized.SelectMany(n => BnbCheckpoint.CompanionNames(q, n)).ToHashSet(StringComparer.Ordinal);
        static bool Skip(string n) => n.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal);
        var names = q.Names.Where(n => !companions.Contains(n) && !Skip(n)).ToHashSet(StringComparer.Ordinal);
        var extra = o.Names.Where(n => !names.Contains(n) && !Skip(n) && n != "lm_head.weight").Order(StringComparer.Ordinal).FirstOrDefault();
        if (extra is not null) throw new QuantizedMergeException($"{dir} has tensor '{extra}', which {quantizedDir} does not: not the same model");
        long codes = 0, codesTotal = 0, others = 0, othersTotal = 0;
        foreach (var name in names.Order(StringComparer.Ordinal))
        {
            using var scope = NewDisposeScope();
            if (!o.Contains(name)) throw new QuantizedMergeException($"{dir} has no tensor '{name}', which {quantizedDir} has: not the same model");
            void RequireShape(long[] shape)
            {
                if (!o.Entry(name).Shape.SequenceEqual(shape))
                    throw new QuantizedMergeException($"{dir}: tensor '{name}' has shape [{string.Join(", ", o.Entry(name).Shape)}] but {quantizedDir}'s is [{string.Join(", ", shape)}]: not the same model");
            }
            switch (BnbCheckpoint.KindOf(q, name))
            {
                case BnbKind.FourBit:
                {
                    using var stored = BnbCheckpoint.Read4Bit(q, name);
                    var s = stored.State;
                    RequireShape(s.shape);
                    var w = o.Read(name, Blockwise4Bit.DtypeOf(s.dtype), CPU); // bnb quantized the weight in this dtype
                    using var mine = Blockwise4Bit.Quantize(w, s.quant_type, s.blocksize, s.Nested);
                    codes += Blockwise4Bit.Unpack(mine.Data, s.Count).ne(Blockwise4Bit.Unpack(stored.Data, s.Count)).sum().item<long>();
                    codesTotal += s.Count;
                    break;
                }
                case BnbKind.Int8:
                {
                    using var stored = BnbCheckpoint.ReadInt8(q, name);
                    RequireShape(stored.Weight.shape);
                    using var mine = Int8RowWise.Quantize(o.Read(name, ScalarType.Float32, CPU));
                    codes += mine.Weight.ne(stored.Weight).sum().item<long>();
                    codesTotal += stored.Weight.numel();
                    break;
                }
                default:
                {
                    RequireShape(q.Entry(name).Shape);
                    var stored = q.ReadStored(name);
                    others += o.Read(name, stored.dtype, CPU).ne(stored).sum().item<long>();
                    othersTotal += stored.numel();
                    break;
                }
            }
        }
        return (codes, codesTotal, others, othersTotal);
    }

    /// <summary>The architecture essentials two checkpoints of one model share (as <see cref="BaseFingerprint"/> hashes them).</summary>
    static string Essentials(ModelConfig c) =>
        $"{c.ModelType} hidden={c.HiddenSize} intermediate={c.IntermediateSize} layers={c.NumHiddenLayers} heads={c.NumAttentionHeads} " +
        $"kv={c.NumKeyValueHeads} head_dim={c.HeadDim} vocab={c.VocabSize} tied={c.TieWordEmbeddings}";
}

/// <summary>A merge onto a quantized base (or of a QLoRA adapter) that cannot be done as asked.</summary>
public sealed class QuantizedMergeException(string message) : LoraKitException(LoraConfigException.OneLine(message));
