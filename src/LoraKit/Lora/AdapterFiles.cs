using System.Text.Json.Nodes;
using LoraKit.IO;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// PEFT's on-disk adapter format: <c>adapter_config.json</c> + <c>adapter_model.safetensors</c> with keys like
/// <c>base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight</c>. Loading fails closed: every tensor must belong
/// to a module the config targets on this base, every targeted module must have both tensors, and every shape must
/// equal what the config's rank and the base model's layer imply — all checked before the model is touched.
/// </summary>
public static class AdapterFiles
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";
    const string Prefix = "base_model.model.";

    /// <summary>An adapter read and validated against a base, its tensors in CPU memory, ready to be injected.</summary>
    public sealed class Prepared(LoraConfig config, Dictionary<string, (Tensor a, Tensor b)> weights) : IDisposable
    {
        public LoraConfig Config { get; } = config;
        public IReadOnlyDictionary<string, (Tensor a, Tensor b)> Weights { get; } = weights;
        public void Dispose() { foreach (var (a, b) in Weights.Values) { a.Dispose(); b.Dispose(); } }
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
    /// <see cref="BaseFingerprint"/> differs) is refused unless <see cref="AdapterLoadOptions.AllowBaseMismatch"/>;
    /// for adapters without a fingerprint (PEFT's) the architecture and shapes are checked, and a differing recorded
    /// base name is a warning.
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
        foreach (var (key, entry) in file.Entries)
        {
            if (seqCls && key.StartsWith(Prefix + "score.", StringComparison.Ordinal)) continue; // the head, loaded separately
            if (!key.StartsWith(Prefix, StringComparison.Ordinal) || !(key.EndsWith(".lora_A.weight", StringComparison.Ordinal) || key.EndsWith(".lora_B.weight", StringComparison.Ordinal)))
                throw new InvalidDataException(LoraConfigException.OneLine($"{weightsPath}: tensor '{key}' is not a LoRA A/B weight in PEFT's naming (DoRA, embeddings and biases are not supported)"));
            string rest = key[Prefix.Length..];
            string module = rest[..^".lora_A.weight".Length];
            string part = rest.EndsWith(".lora_A.weight", StringComparison.Ordinal) ? "A" : "B";
            if (!byModule.TryGetValue(module, out var parts)) byModule[module] = parts = [];
            parts[part] = entry;
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
            if (!byModule.TryGetValue(key, out var parts) || !parts.ContainsKey("A") || !parts.ContainsKey("B"))
                throw new InvalidDataException(LoraConfigException.OneLine($"{dir}: the adapter file has no lora_A/lora_B weights for targeted module '{key}'"));
            int r = config.RankFor(key);
            var (inF, outF) = lm.LinearShapes[key];
            Check(parts["A"], [r, inF], r, dir);
            Check(parts["B"], [outF, r], r, dir);
        }
        var weights = new Dictionary<string, (Tensor, Tensor)>();
        foreach (var key in targets)
        {
            using var a = file.Read(byModule[key]["A"].Name);
            using var b = file.Read(byModule[key]["B"].Name);
            var a32 = a.to(ScalarType.Float32, copy: true).DetachFromDisposeScope();
            var b32 = b.to(ScalarType.Float32, copy: true).DetachFromDisposeScope();
            weights[key] = (a32, b32);
            try
            {
                CheckFinite(a32, byModule[key]["A"].Name, weightsPath);
                CheckFinite(b32, byModule[key]["B"].Name, weightsPath);
            }
            catch
            {
                foreach (var (x, y) in weights.Values) { x.Dispose(); y.Dispose(); }
                throw;
            }
        }
        return new Prepared(config, weights);
    }

    /// <summary>Injects a prepared adapter under <paramref name="name"/> and makes it active (the model's thread).</summary>
    public static LoraConfig Apply(LoraModel lm, string name, Prepared p)
    {
        using var _ = no_grad();
        foreach (var (key, (a, b)) in p.Weights)
            lm.WrapForLoad(key).AddAdapter(name, new LoraWeights(new Parameter(a.to(lm.Model.Device, copy: true), true),
                new Parameter(b.to(lm.Model.Device, copy: true), true), p.Config.Scaling(key), p.Config.LoraDropout));
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
            throw new InvalidDataException(LoraConfigException.OneLine($"{where}: tensor '{tensorName}' has {bad} non-finite value{(bad == 1 ? "" : "s")} (NaN or infinity)"));
        double max = f.abs().max().item<float>();
        if (max > maxAbs)
            throw new InvalidDataException(LoraConfigException.OneLine($"{where}: tensor '{tensorName}' has a value of magnitude {max:G3}, beyond the {maxAbs:G} a LoRA weight can plausibly have"));
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
        SafetensorsWriter.Save(Path.Combine(dir, WeightsFile), tensors, metadata);
        var basePath = baseModelPath ?? lm.Model.NameOrPath;
        (basePath is null ? config : config with { BaseModelNameOrPath = basePath }).Save(dir);
    }
}

/// <summary>How <see cref="AdapterFiles"/> treats an adapter whose recorded base is not the loaded one.</summary>
public sealed record AdapterLoadOptions
{
    public static readonly AdapterLoadOptions Default = new();

    /// <summary>Load an adapter LoraKit wrote for another base anyway (shapes must still fit); a warning is issued.</summary>
    public bool AllowBaseMismatch { get; init; }

    /// <summary>Where warnings go (default: one "warning: …" line on stderr; null = silent).</summary>
    public Action<string>? Warn { get; init; } = message => Console.Error.WriteLine($"warning: {message}");
}
