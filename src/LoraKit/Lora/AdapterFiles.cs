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

    public static LoraConfig Load(LoraModel lm, string name, string dir)
    {
        using var prepared = Read(lm, dir);
        return Apply(lm, name, prepared);
    }

    /// <summary>
    /// Reads and validates an adapter for <paramref name="lm"/>'s base without touching the model (safe on any thread:
    /// it only consults the immutable layer shapes).
    /// </summary>
    public static Prepared Read(LoraModel lm, string dir)
    {
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"adapter directory '{dir}' does not exist");
        if (!File.Exists(Path.Combine(dir, ConfigFile)) && File.Exists(Path.Combine(dir, "adapter", ConfigFile)))
            throw new LoraConfigException($"'{dir}' is a training run folder, not an adapter; its adapter is '{Path.Combine(dir, "adapter")}'");
        var config = LoraConfig.Load(dir);
        config.Validate();
        // A sequence-classification adapter carries its head (score) as modules_to_save; the head is loaded by
        // Training.SequenceClassifier, the LoRA weights here. Anything else in modules_to_save is not supported.
        bool seqCls = config.TaskType == "SEQ_CLS";
        if (config.ModulesToSave is { Count: > 0 } mts && !(seqCls && mts.All(m => m is "score" or "classifier")))
            throw new LoraConfigException($"{dir}: modules_to_save ({string.Join(", ", mts)}) is not supported (only a SEQ_CLS score head)");
        if (config.Extra["auto_mapping"] is JsonObject am && am["base_model_class"]?.GetValue<string>() is string cls && cls != lm.Model.Config.Architecture)
            throw new LoraConfigException($"{dir}: adapter was made for a {cls}, but the base model is a {lm.Model.Config.Architecture}");

        var weightsPath = Path.Combine(dir, WeightsFile);
        if (!File.Exists(weightsPath))
            throw new FileNotFoundException(File.Exists(Path.Combine(dir, "adapter_model.bin"))
                ? $"{dir}: only adapter_model.bin found; LoraKit reads safetensors only (pickle files can run code)"
                : $"{dir}: {WeightsFile} not found");
        using var file = SafetensorsFile.Open(weightsPath);

        // Group the file's tensors by module path.
        var byModule = new Dictionary<string, Dictionary<string, SafetensorsEntry>>(StringComparer.Ordinal);
        foreach (var (key, entry) in file.Entries)
        {
            if (seqCls && key.StartsWith(Prefix + "score.", StringComparison.Ordinal)) continue; // the head, loaded separately
            if (!key.StartsWith(Prefix, StringComparison.Ordinal) || !(key.EndsWith(".lora_A.weight", StringComparison.Ordinal) || key.EndsWith(".lora_B.weight", StringComparison.Ordinal)))
                throw new InvalidDataException($"{weightsPath}: tensor '{key}' is not a LoRA A/B weight in PEFT's naming (DoRA, embeddings and biases are not supported)");
            string rest = key[Prefix.Length..];
            string module = rest[..^".lora_A.weight".Length];
            string part = rest.EndsWith(".lora_A.weight", StringComparison.Ordinal) ? "A" : "B";
            if (!byModule.TryGetValue(module, out var parts)) byModule[module] = parts = [];
            parts[part] = entry;
        }

        var linear = lm.LinearKeys().ToHashSet();
        if (byModule.Count > 0 && !byModule.Keys.Any(linear.Contains))
            throw new InvalidDataException($"{dir}: none of the adapter's weights match a module of this {lm.Model.Config.Architecture} " +
                $"(first: '{byModule.Keys.First()}'); it was made for another model");
        var targets = lm.TargetKeys(config);
        config = lm.Resolve(config);
        foreach (var module in byModule.Keys)
            if (!targets.Contains(module))
                throw new InvalidDataException($"{dir}: the adapter has weights for '{module}', which its config does not target on this base model");
        foreach (var key in targets)
        {
            if (!byModule.TryGetValue(key, out var parts) || !parts.ContainsKey("A") || !parts.ContainsKey("B"))
                throw new InvalidDataException($"{dir}: the adapter file has no lora_A/lora_B weights for targeted module '{key}'");
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
            weights[key] = (a.to(ScalarType.Float32, copy: true).DetachFromDisposeScope(), b.to(ScalarType.Float32, copy: true).DetachFromDisposeScope());
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
        if (!e.Shape.SequenceEqual(expected))
            throw new InvalidDataException($"{dir}: tensor '{e.Name}' has shape [{string.Join(", ", e.Shape)}] but the adapter config (r={r}) " +
                $"and the base model imply [{string.Join(", ", expected)}]; the adapter does not fit this base model");
    }

    /// <summary>Writes the adapter in PEFT's format (fp32 weights, as PEFT keeps them).</summary>
    public static void Save(LoraModel lm, string name, string dir, string? baseModelPath = null)
    {
        if (!lm.Configs.TryGetValue(name, out var config)) throw new KeyNotFoundException($"no adapter named '{name}'");
        Directory.CreateDirectory(dir);
        var tensors = lm.Parameters(name).ToDictionary(p => Prefix + p.key, p => (Tensor)p.param);
        SafetensorsWriter.Save(Path.Combine(dir, WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        (baseModelPath is null ? config : config with { BaseModelNameOrPath = baseModelPath }).Save(dir);
    }
}
