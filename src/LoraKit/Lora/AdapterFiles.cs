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
    /// <summary>A sequence-classification adapter's head, as PEFT saves a modules_to_save "score" layer.</summary>
    public const string ScoreKey = Prefix + "score.weight";
    /// <summary>The label names of a sequence-classification adapter (a JSON array; PEFT itself stores none).</summary>
    public const string LabelsFile = "labels.json";

    /// <summary>An adapter read and validated against a base, its tensors in CPU memory, ready to be injected.</summary>
    public sealed class Prepared(LoraConfig config, Dictionary<string, (Tensor a, Tensor b)> weights) : IDisposable
    {
        public LoraConfig Config { get; } = config;
        public IReadOnlyDictionary<string, (Tensor a, Tensor b)> Weights { get; } = weights;
        public void Dispose() { foreach (var (a, b) in Weights.Values) { a.Dispose(); b.Dispose(); } }
    }

    public static LoraConfig Load(LoraModel lm, string name, string dir, bool sequenceClassification = false)
    {
        using var prepared = Read(lm, dir, sequenceClassification);
        return Apply(lm, name, prepared);
    }

    /// <summary>
    /// Reads and validates an adapter for <paramref name="lm"/>'s base without touching the model (safe on any thread:
    /// it only consults the immutable layer shapes). A sequence-classification adapter is refused unless the caller
    /// says it will use the head (<paramref name="sequenceClassification"/>): run as a causal LM it would produce garbage.
    /// </summary>
    public static Prepared Read(LoraModel lm, string dir, bool sequenceClassification = false)
    {
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"adapter directory '{dir}' does not exist");
        var config = LoraConfig.Load(dir);
        config.Validate();
        // A sequence-classification adapter carries its head (score) as modules_to_save; the head is loaded by
        // Training.SequenceClassifier, the LoRA weights here. Anything else in modules_to_save is not supported.
        bool seqCls = config.TaskType == "SEQ_CLS";
        if (seqCls && !sequenceClassification) throw AdapterTask.NotForGeneration(dir, Task(dir));
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
        try { node = JsonNode.Parse(File.ReadAllText(path)); }
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
