using System.Text.Json.Nodes;
using LoraKit.IO;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// PEFT's on-disk adapter format: <c>adapter_config.json</c> + <c>adapter_model.safetensors</c> with keys like
/// <c>base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight</c> (and, for DoRA, <c>….q_proj.lora_magnitude_vector</c>:
/// the keys of the config's variant, <see cref="ILoraVariant.FileSuffixes"/>). Loading fails closed: every tensor must
/// belong to a module the config targets on this base, every targeted module must have all its variant's tensors, and
/// every shape must equal what the config's rank and the base model's layer imply — all checked before the model is touched.
/// </summary>
public static class AdapterFiles
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";
    const string Prefix = "base_model.model.";
    /// <summary>A sequence-classification adapter's head, as PEFT saves a modules_to_save "score" layer.</summary>
    public const string ScoreKey = Prefix + "score.weight";
    /// <summary>The label names of a sequence-classification adapter (a JSON array; PEFT itself stores none).</summary>
    public const string LabelsFile = "labels.json";

    /// <summary>One module's adapter tensors as read: A [r, in], B [out, r], DoRA's magnitude [out] (fp32, CPU).</summary>
    public sealed record ModuleWeights(Tensor A, Tensor B, Tensor? Magnitude) : IDisposable
    {
        /// <summary>A and B (callers that only look at the low-rank pair).</summary>
        public void Deconstruct(out Tensor a, out Tensor b) { a = A; b = B; }
        /// <summary>Frees the tensors.</summary>
        public void Dispose() { A.Dispose(); B.Dispose(); Magnitude?.Dispose(); }
    }

    /// <summary>An adapter read and validated against a base, its tensors in CPU memory, ready to be injected.</summary>
    public sealed class Prepared(LoraConfig config, Dictionary<string, ModuleWeights> weights) : IDisposable
    {
        /// <summary>The adapter's config, targets resolved against the base.</summary>
        public LoraConfig Config { get; } = config;
        /// <summary>The tensors by module path.</summary>
        public IReadOnlyDictionary<string, ModuleWeights> Weights { get; } = weights;
        /// <summary>Frees the tensors.</summary>
        public void Dispose() { foreach (var w in Weights.Values) w.Dispose(); }
    }

    /// <summary>
    /// Reads, validates and injects an adapter under <paramref name="name"/> and makes it active. The model is left in
    /// evaluation mode (as PEFT's from_pretrained without is_trainable): LoRA dropout is off; a trainer switches to
    /// training mode itself.
    /// </summary>
    public static LoraConfig Load(LoraModel lm, string name, string dir, AdapterLoadOptions? options = null)
    {
        using var prepared = Read(lm, dir, options);
        var config = Apply(lm, name, prepared);
        lm.Model.eval();
        return config;
    }

    /// <summary>Largest |value| accepted in adapter weights; beyond it B·A overflows fp16/bf16 activations.</summary>
    public const double MaxAbsWeight = 1e6;

    /// <summary>
    /// Reads and validates an adapter for <paramref name="lm"/>'s base without touching the model (safe on any thread:
    /// it only consults the immutable layer shapes). An adapter LoraKit wrote for another base (its recorded
    /// <see cref="Models.BaseFingerprint"/> differs) is refused unless <see cref="AdapterLoadOptions.AllowBaseMismatch"/>;
    /// for adapters without a fingerprint (PEFT's) the architecture and shapes are checked, and a differing recorded
    /// base name is a warning. A sequence-classification adapter is refused unless the caller says it will use the head
    /// (<see cref="AdapterLoadOptions.SequenceClassification"/>): run as a causal LM it would produce garbage.
    /// </summary>
    public static Prepared Read(LoraModel lm, string dir, AdapterLoadOptions? options = null)
    {
        options ??= AdapterLoadOptions.Default;
        if (!Directory.Exists(dir))
            throw new DirectoryNotFoundException(File.Exists(dir)
                ? $"adapter '{dir}' is a file; give the directory holding {ConfigFile} and {WeightsFile}"
                : $"adapter directory '{dir}' does not exist");
        var config = LoraConfig.Load(dir);
        var configPath = Path.Combine(dir, ConfigFile);
        try { config.Validate(); }
        catch (LoraConfigException e) { throw new LoraConfigException($"{configPath}: {e.Message}"); }
        // A sequence-classification adapter carries its head (score) as modules_to_save; the head is loaded by
        // Training.SequenceClassifier, the LoRA weights here. Anything else in modules_to_save is not supported.
        bool seqCls = config.TaskType == "SEQ_CLS";
        if (seqCls && !options.SequenceClassification) throw AdapterTask.NotForGeneration(dir, Task(dir));
        if (config.ModulesToSave is { Count: > 0 } mts && !(seqCls && mts.All(m => m is "score" or "classifier")))
            throw new LoraConfigException($"{dir}: modules_to_save ({string.Join(", ", mts)}) is not supported (only a SEQ_CLS score head)");
        if (config.Extra["auto_mapping"] is JsonObject am && am["base_model_class"] is JsonValue bmc && bmc.TryGetValue<string>(out var cls)
            && cls != lm.Model.Config.Architecture && !options.AllowBaseMismatch)
            throw new AdapterBaseMismatchException($"{dir}: adapter was made for a {cls}, but the base model is a {lm.Model.Config.Architecture}");

        var weightsPath = Path.Combine(dir, WeightsFile);
        if (!File.Exists(weightsPath))
            throw new FileNotFoundException(File.Exists(Path.Combine(dir, "adapter_model.bin"))
                ? $"{dir}: only adapter_model.bin found; LoraKit reads safetensors only (pickle files can run code)"
                : $"{dir}: {WeightsFile} not found");
        using var file = SafetensorsFile.Open(weightsPath);
        CheckBase(lm, dir, config, file, options);

        try { return ReadWeights(lm, dir, config, seqCls, file, weightsPath); }
        catch (LoraConfigException e) when (e is not AdapterBaseMismatchException && !e.Message.StartsWith(dir, StringComparison.Ordinal))
        {
            throw new LoraConfigException($"{configPath}: {e.Message}"); // targeting and rank errors, named by file
        }
    }

    /// <summary>Groups the file's tensors by module, checks them against the config's targets and ranks, reads them.</summary>
    static Prepared ReadWeights(LoraModel lm, string dir, LoraConfig config, bool seqCls, SafetensorsFile file, string weightsPath)
    {
        var byModule = new Dictionary<string, Dictionary<string, SafetensorsEntry>>(StringComparer.Ordinal);
        var suffixes = config.Variant.FileSuffixes;
        foreach (var (key, entry) in file.Entries)
        {
            if (seqCls && key.StartsWith(Prefix + "score.", StringComparison.Ordinal)) continue; // the head, loaded separately
            string? suffix = key.StartsWith(Prefix, StringComparison.Ordinal) ? suffixes.FirstOrDefault(s => key.EndsWith("." + s, StringComparison.Ordinal)) : null;
            if (suffix is null)
                throw new InvalidDataException(LoraConfigException.OneLine(key.EndsWith("." + DoraVariant.MagnitudeSuffix, StringComparison.Ordinal)
                    ? $"{weightsPath}: tensor '{key}' is a DoRA magnitude, but {ConfigFile} does not set use_dora: true"
                    : $"{weightsPath}: tensor '{key}' is not a {config.Variant.Name} weight in PEFT's naming ({string.Join(", ", suffixes)}; embeddings and biases are not supported)"));
            string module = key[Prefix.Length..^(suffix.Length + 1)];
            if (!byModule.TryGetValue(module, out var parts)) byModule[module] = parts = [];
            parts[suffix] = entry;
        }

        var linear = lm.LinearKeys().ToHashSet();
        if (byModule.Count > 0 && !byModule.Keys.Any(linear.Contains))
            throw new InvalidDataException(LoraConfigException.OneLine($"{dir}: none of the adapter's weights match a module of this {lm.Model.Config.Architecture} " +
                $"(first: '{byModule.Keys.First()}'); it was made for another model"));
        var targets = lm.TargetKeys(config);
        config = lm.Resolve(config);
        foreach (var module in byModule.Keys)
            if (!targets.Contains(module))
                throw new InvalidDataException(LoraConfigException.OneLine($"{dir}: the adapter has weights for '{module}', which its config does not target on this base model"));
        lm.CheckRanks(config, targets);
        try { foreach (var key in targets) _ = config.Scaling(key); }
        catch (System.Text.RegularExpressions.RegexMatchTimeoutException) { throw new LoraConfigException("an alpha_pattern key is a regex too slow to match module names"); }
        foreach (var key in targets)
        {
            var parts = byModule.GetValueOrDefault(key);
            var missing = parts is null ? LoraVariant.ASuffix : suffixes.FirstOrDefault(s => !parts.ContainsKey(s));
            if (parts is null || missing is not null)
                throw new InvalidDataException(LoraConfigException.OneLine(missing == DoraVariant.MagnitudeSuffix
                    ? $"{dir}: the DoRA adapter file has no {DoraVariant.MagnitudeSuffix} for targeted module '{key}'"
                    : $"{dir}: the adapter file has no lora_A/lora_B weights for targeted module '{key}'"));
            int r = config.RankFor(key);
            var (inF, outF) = lm.LinearShapes[key];
            Check(parts![LoraVariant.ASuffix], [r, inF], r, dir);
            Check(parts[LoraVariant.BSuffix], [outF, r], r, dir);
            if (parts.TryGetValue(DoraVariant.MagnitudeSuffix, out var m)) Check(m, [outF], r, dir);
        }
        var weights = new Dictionary<string, ModuleWeights>();
        try
        {
            foreach (var key in targets)
            {
                var parts = byModule[key];
                Tensor ReadChecked(string suffix)
                {
                    using var t = file.Read(parts[suffix].Name);
                    var t32 = t.to(ScalarType.Float32, copy: true).DetachFromDisposeScope();
                    try { CheckFinite(t32, parts[suffix].Name, weightsPath); }
                    catch { t32.Dispose(); throw; }
                    return t32;
                }
                var a32 = ReadChecked(LoraVariant.ASuffix);
                Tensor? b32 = null;
                try
                {
                    b32 = ReadChecked(LoraVariant.BSuffix);
                    weights[key] = new ModuleWeights(a32, b32, parts.ContainsKey(DoraVariant.MagnitudeSuffix) ? ReadChecked(DoraVariant.MagnitudeSuffix) : null);
                }
                catch { a32.Dispose(); b32?.Dispose(); throw; }
            }
        }
        catch
        {
            foreach (var w in weights.Values) w.Dispose();
            throw;
        }
        return new Prepared(config, weights);
    }

    /// <summary>Injects a prepared adapter under <paramref name="name"/> and makes it active (the model's thread).</summary>
    public static LoraConfig Apply(LoraModel lm, string name, Prepared p)
    {
        using var _ = no_grad();
        Parameter OnDevice(Tensor t) => new(t.to(lm.Model.Device, copy: true), true);
        foreach (var (key, w) in p.Weights)
            lm.WrapForLoad(key).AddAdapter(name, new LoraWeights(OnDevice(w.A), OnDevice(w.B), p.Config.Scaling(key), p.Config.LoraDropout,
                p.Config.Variant, w.Magnitude is { } m ? OnDevice(m) : null));
        lm.Register(name, p.Config);
        lm.SetActive(name);
        return p.Config;
    }

    static void Check(SafetensorsEntry e, long[] expected, int r, string dir)
    {
        if (e.DType is not ("F32" or "F16" or "BF16" or "F64"))
            throw new InvalidDataException(LoraConfigException.OneLine($"{dir}: tensor '{e.Name}' has dtype {e.DType}; LoRA weights must be floating point (F32, BF16, F16)"));
        if (!e.Shape.SequenceEqual(expected))
            throw new InvalidDataException(LoraConfigException.OneLine($"{dir}: tensor '{e.Name}' has shape [{string.Join(", ", e.Shape)}] but the adapter config (r={r}) " +
                $"and the base model imply [{string.Join(", ", expected)}]; the adapter does not fit this base model"));
    }

    /// <summary>
    /// Refuses NaN, ±Inf and absurd magnitudes (|x| &gt; <see cref="MaxAbsWeight"/>) in <paramref name="t"/>, naming the
    /// tensor and where it comes from (read) or goes to (write).
    /// </summary>
    public static void CheckFinite(Tensor t, string tensorName, string where, double maxAbs = MaxAbsWeight)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        if (t.numel() == 0) return;
        var f = t.detach().to(ScalarType.Float32);
        long bad = f.isfinite().logical_not().sum().item<long>();
        if (bad > 0)
            throw new WeightValueException(LoraConfigException.OneLine($"{where}: tensor '{tensorName}' has {bad} non-finite value{(bad == 1 ? "" : "s")} (NaN or infinity)"));
        double max = f.abs().max().item<float>();
        if (max > maxAbs)
            throw new WeightValueException(LoraConfigException.OneLine($"{where}: tensor '{tensorName}' has a value of magnitude {max:G3}, beyond the {maxAbs:G} a LoRA weight can plausibly have"));
    }

    /// <summary>Refuses an adapter LoraKit wrote for another base; warns when a PEFT adapter names another base.</summary>
    static void CheckBase(LoraModel lm, string dir, LoraConfig config, SafetensorsFile file, AdapterLoadOptions options)
    {
        var model = lm.Model;
        string here = $"{DisplayName(model.NameOrPath) ?? "this model"} ({model.Config.ModelType})";
        if (file.Metadata.TryGetValue(Models.BaseFingerprint.MetadataKey, out var recorded) && model.Fingerprint is { } actual)
        {
            if (string.Equals(recorded, actual, StringComparison.OrdinalIgnoreCase)) return;
            file.Metadata.TryGetValue(Models.BaseFingerprint.ModelTypeKey, out var recordedType);
            string there = $"{DisplayName(config.BaseModelNameOrPath) ?? "an unnamed model"}{(recordedType is null ? "" : $" ({recordedType})")}";
            string message = $"{dir}: adapter was trained on another base model, {there}, fingerprint {Models.BaseFingerprint.Short(recorded)}; " +
                $"the loaded base is {here}, fingerprint {Models.BaseFingerprint.Short(actual)}";
            if (!options.AllowBaseMismatch) throw new AdapterBaseMismatchException(message);
            options.Warn?.Invoke(LoraConfigException.OneLine($"{message} (loading anyway, as asked)"));
            return;
        }
        // No fingerprint (made by PEFT or an older LoraKit): shapes are checked by the caller; names can only be compared.
        if (DisplayName(config.BaseModelNameOrPath) is { } named && DisplayName(model.NameOrPath) is { } ours
            && !string.Equals(named, ours, StringComparison.OrdinalIgnoreCase))
            options.Warn?.Invoke(LoraConfigException.OneLine($"{dir}: adapter records base model '{config.BaseModelNameOrPath}', but it is being loaded onto {here}; " +
                "its shapes fit, but if it was trained on another model its outputs will be wrong"));
    }

    /// <summary>
    /// The comparable name of a model path or hub id: its last component ("Qwen/Qwen2-0.5B" and "/models/Qwen2-0.5B"
    /// agree); inside a Hugging Face cache (models--Org--Name/snapshots/REV) the repository's name.
    /// </summary>
    static string? DisplayName(string? nameOrPath)
    {
        if (string.IsNullOrWhiteSpace(nameOrPath)) return null;
        var parts = nameOrPath.Replace('\\', '/').Split('/', StringSplitOptions.RemoveEmptyEntries);
        if (parts.Length == 0) return null;
        int snap = Array.LastIndexOf(parts, "snapshots");
        if (snap > 0 && parts[snap - 1].StartsWith("models--", StringComparison.Ordinal)) return parts[snap - 1].Split("--")[^1];
        return parts[^1];
    }

    /// <summary>
    /// Writes the adapter in PEFT's format (fp32 weights, as PEFT keeps them), recording its base: the config's
    /// base_model_name_or_path (<paramref name="baseModelPath"/>, else the directory the base was loaded from) and the
    /// base's <see cref="Models.BaseFingerprint"/> in the safetensors metadata. Non-finite weights are refused before
    /// anything is written.
    /// </summary>
    public static void Save(LoraModel lm, string name, string dir, string? baseModelPath = null)
    {
        if (!lm.Configs.TryGetValue(name, out var config)) throw new KeyNotFoundException($"no adapter named '{name}'");
        var tensors = lm.Parameters(name).ToDictionary(p => Prefix + p.key, p => (Tensor)p.param);
        foreach (var (key, t) in tensors) CheckFinite(t, key, $"adapter '{name}' (not written to {dir})");
        Directory.CreateDirectory(dir);
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        if (lm.Model.Fingerprint is { } fp)
        {
            metadata[Models.BaseFingerprint.MetadataKey] = fp;
            metadata[Models.BaseFingerprint.ModelTypeKey] = lm.Model.Config.ModelType;
        }
        // Trained on a quantized base: record which quantization, so merge can rebuild the weights the adapter saw.
        if (lm.Model.Quantization is { } q) metadata[Quantization.BnbQuantizeOptions.AdapterMetadataKey] = q.ToJson();
        SafetensorsWriter.Save(Path.Combine(dir, WeightsFile), tensors, metadata);
        var basePath = baseModelPath ?? lm.Model.NameOrPath;
        (basePath is null ? config : config with { BaseModelNameOrPath = basePath }).Save(dir);
    }

    /// <summary>
    /// What an adapter is for: its PEFT task type and, for a sequence-classification adapter, its label names — from
    /// labels.json, or transformers' defaults (LABEL_0, LABEL_1, …) for a PEFT-made adapter that has only the head.
    /// </summary>
    public static AdapterTask Task(string dir)
    {
        var config = LoraConfig.Load(dir);
        if (config.TaskType != "SEQ_CLS") return new AdapterTask(config.TaskType, null);
        var labelsPath = Path.Combine(dir, LabelsFile);
        if (File.Exists(labelsPath)) return new AdapterTask(config.TaskType, ReadLabels(labelsPath));
        var weights = Path.Combine(dir, WeightsFile);
        if (!File.Exists(weights)) throw new LoraConfigException($"{dir}: {WeightsFile} not found");
        using var f = SafetensorsFile.Open(weights);
        if (!f.Entries.TryGetValue(ScoreKey, out var e) || e.Shape.Length != 2)
            throw new LoraConfigException($"{weights}: a SEQ_CLS adapter needs its score head '{ScoreKey}' (a [labels, hidden] matrix), and it has none");
        if (e.Shape[0] < 2 || e.Shape[0] > MaxLabels)
            throw new LoraConfigException($"{weights}: the score head has {e.Shape[0]} rows; a classifier needs 2 to {MaxLabels} labels");
        return new AdapterTask(config.TaskType, Enumerable.Range(0, (int)e.Shape[0]).Select(i => $"LABEL_{i}").ToList());
    }

    /// <summary>The most labels a classification head may have (a bound on what a file can make LoraKit allocate).</summary>
    public const int MaxLabels = 100_000;

    /// <summary>Reads labels.json: a JSON array of 2 or more distinct, non-empty strings.</summary>
    public static List<string> ReadLabels(string path)
    {
        JsonNode? node;
        try { node = JsonNode.Parse(IO.JsonFiles.ReadText(path)); }
        catch (System.Text.Json.JsonException) { throw new LoraConfigException($"{path}: not valid JSON (expected an array of label names)"); }
        if (node is not JsonArray a) throw new LoraConfigException($"{path}: expected a JSON array of label names");
        if (a.Count > MaxLabels) throw new LoraConfigException($"{path}: {a.Count} labels; a classifier needs 2 to {MaxLabels}");
        var labels = new List<string>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var x in a)
        {
            string? s = null;
            try { if (x is JsonValue v) v.TryGetValue(out s); }
            catch (InvalidOperationException) { throw new LoraConfigException($"{path}: label {labels.Count} is not valid Unicode"); }
            if (s is null) throw new LoraConfigException($"{path}: label {labels.Count} is not a string");
            if (s.Length == 0) throw new LoraConfigException($"{path}: label {labels.Count} is empty");
            if (!seen.Add(s)) throw new LoraConfigException($"{path}: label {labels.Count} ({System.Text.Json.JsonSerializer.Serialize(s)}) appears twice");
            labels.Add(s);
        }
        if (labels.Count < 2 || labels.Count > MaxLabels) throw new LoraConfigException($"{path}: {labels.Count} label(s); a classifier needs 2 to {MaxLabels}");
        return labels;
    }
}

/// <summary>What an adapter was trained for (PEFT's task_type) and, for SEQ_CLS, its labels.</summary>
public sealed record AdapterTask(string TaskType, IReadOnlyList<string>? Labels)
{
    public bool IsSequenceClassification => TaskType == "SEQ_CLS";

    public string LabelList => Labels is null ? "" : string.Join(", ", Labels.Count > 20 ? Labels.Take(20).Append($"… {Labels.Count - 20} more") : Labels);

    /// <summary>The error for a classification adapter used to generate or score text.</summary>
    public static AdapterTaskException NotForGeneration(string adapter, AdapterTask t) =>
        new($"adapter {adapter} is a sequence-classification adapter (labels: {t.LabelList}); use `lorakit classify`");

    /// <summary>The error for a causal-LM adapter used to classify.</summary>
    public static AdapterTaskException NotForClassification(string adapter, AdapterTask t) =>
        new($"adapter {adapter} is a {(System.Text.RegularExpressions.Regex.IsMatch(t.TaskType, "^[A-Z_]{1,40}\\z") ? t.TaskType : "task_type " + System.Text.Json.JsonSerializer.Serialize(t.TaskType))} adapter (no classification head and labels), not a sequence-classification (SEQ_CLS) adapter; use it with `lorakit generate` or `lorakit score`");
}

/// <summary>An adapter used for a task it was not trained for (a classifier as a causal LM, or the reverse).</summary>
public sealed class AdapterTaskException(string message) : LoraKitException(message);

/// <summary>How <see cref="AdapterFiles"/> treats an adapter whose recorded base is not the loaded one.</summary>
public sealed record AdapterLoadOptions
{
    public static readonly AdapterLoadOptions Default = new();

    /// <summary>Load an adapter LoraKit wrote for another base anyway (shapes must still fit); a warning is issued.</summary>
    public bool AllowBaseMismatch { get; init; }

    /// <summary>The caller will use a sequence-classification adapter's head; otherwise such an adapter is refused.</summary>
    public bool SequenceClassification { get; init; }

    /// <summary>Where warnings go (default: one "warning: …" line on stderr; null = silent).</summary>
    public Action<string>? Warn { get; init; } = message => Console.Error.WriteLine($"warning: {message}");
}

/// <summary>LoRA weights that are non-finite or implausibly large (a corrupt file, or a training run that diverged).</summary>
public sealed class WeightValueException(string message) : LoraKitException(message);
