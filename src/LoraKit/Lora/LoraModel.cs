using LoraKit.Models;
using TorchSharp.Modules;
using Linear = LoraKit.Models.Linear;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// A frozen <see cref="CausalLM"/> with named LoRA adapters injected into its linear layers (PEFT's LoraModel).
/// Several adapters can be loaded at once; choosing the active one is a flag flip, never a base reload.
/// </summary>
public sealed class LoraModel : IDisposable
{
    readonly Dictionary<string, LoraConfig> _configs = new(StringComparer.Ordinal);

    public CausalLM Model { get; }
    public IReadOnlyDictionary<string, LoraConfig> Configs => _configs;

    /// <summary>Wraps <paramref name="model"/> and puts it in evaluation mode (no LoRA dropout); trainers call train() themselves.</summary>
    public LoraModel(CausalLM model)
    {
        Model = model;
        model.eval();
        // Layer paths and shapes never change once built (wrapping keeps both), so they are read once and can be
        // consulted from any thread — the serving engine validates adapters off its decode thread.
        LinearShapes = model.named_modules()
            .Where(m => m.module is Linear && m.name != "lm_head" && !m.name.EndsWith(".base_layer", StringComparison.Ordinal))
            .ToDictionary(m => m.name, m => (((Linear)m.module).InFeatures, ((Linear)m.module).OutFeatures));
        _linearKeys = LinearShapes.Keys.ToList();
    }

    readonly List<string> _linearKeys;

    /// <summary>in/out features of every linear layer LoRA can wrap, by module path.</summary>
    public IReadOnlyDictionary<string, (long InFeatures, long OutFeatures)> LinearShapes { get; }

    /// <summary>Every wrapped layer with its module path (e.g. model.layers.0.self_attn.q_proj).</summary>
    public IEnumerable<(string key, LoraLinear layer)> LoraLayers() =>
        _layers ??= Model.named_modules().Where(m => m.module is LoraLinear).Select(m => (m.name, (LoraLinear)m.module)).ToList();

    // The wrapped layers in model order, found once per wrap: serving consults them on every decode step, and the
    // model's module tree also holds every adapter's registered tensors, so walking it each time grows with the adapters.
    List<(string key, LoraLinear layer)>? _layers;

    /// <summary>Module paths of the base model's linear layers that LoRA can wrap (every Linear but the LM head).</summary>
    public IReadOnlyList<string> LinearKeys() => _linearKeys;

    /// <summary>
    /// The distinct names of the wrappable linear layers in model order (PEFT's all-linear as module names):
    /// q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj on the Llama family; qkv_proj, o_proj,
    /// gate_up_proj, down_proj on Phi-3.
    /// </summary>
    public IReadOnlyList<string> ProjectionNames() => _linearKeys.Select(k => k[(k.LastIndexOf('.') + 1)..]).Distinct().ToList();

    /// <summary>PEFT expands "all-linear" into the explicit list of module paths; so do we (and so does the saved config).</summary>
    public LoraConfig Resolve(LoraConfig config) =>
        config.TargetRegex == LoraConfig.AllLinear ? config with { TargetRegex = null, TargetModules = LinearKeys() } : config;

    /// <summary>The module paths an adapter config selects on this model; an error if it selects none.</summary>
    public IReadOnlyList<string> TargetKeys(LoraConfig config)
    {
        config.Validate();
        config = Resolve(config);
        List<string> keys;
        try { keys = LinearKeys().Where(config.Targets).ToList(); }
        catch (System.Text.RegularExpressions.RegexMatchTimeoutException)
        {
            throw new LoraConfigException($"target_modules / layers_pattern {Describe(config)} is a regex too slow to match module names (catastrophic backtracking)");
        }
        if (keys.Count == 0)
            throw new LoraConfigException($"target modules {Describe(config)} match no linear layer of this {Model.Config.Architecture} " +
                $"(its layers are named like {string.Join(", ", LinearKeys().Take(7).Select(k => k.Split('.')[^1]).Distinct())})");
        return keys;
    }

    /// <summary>
    /// Refuses ranks above a targeted layer's smaller dimension: B·A then has more parameters than the full update
    /// and no more expressiveness, and an absurd r (100000) would allocate gigabytes before anything else fails.
    /// </summary>
    public void CheckRanks(LoraConfig config, IEnumerable<string> keys)
    {
        foreach (var key in keys)
        {
            int r;
            try { r = config.RankFor(key); }
            catch (System.Text.RegularExpressions.RegexMatchTimeoutException) { throw new LoraConfigException("a rank_pattern key is a regex too slow to match module names"); }
            var (inF, outF) = LinearShapes[key];
            long max = Math.Min(inF, outF);
            if (r > max)
                throw new LoraConfigException($"rank {r} for '{key}' exceeds the layer's smaller dimension min(in={inF}, out={outF}) = {max}");
        }
    }

    static string Describe(LoraConfig c) => c.TargetRegex ?? "[" + string.Join(", ", c.TargetModules!) + "]";

    /// <summary>Injects a new adapter with fresh weights (PEFT's initialisation, DoRA's included) and makes it the active one.</summary>
    public void AddAdapter(string name, LoraConfig config, long seed = 0)
    {
        var keys = TargetKeys(config);
        config = Resolve(config);
        CheckRanks(config, keys);
        var gen = new Generator((ulong)seed);
        using var _ = no_grad();
        foreach (var key in keys)
        {
            var layer = Wrap(key);
            int r = config.RankFor(key);
            long inF = layer.base_layer.InFeatures, outF = layer.base_layer.OutFeatures;
            // Drawn on the CPU (the seeded generator lives there), so an adapter starts the same on every device.
            using var a = empty(r, inF, ScalarType.Float32);
            using var b = empty(outF, r, ScalarType.Float32);
            InitLoraWeights(a, b, config.InitLoraWeights, r, gen);
            layer.AddAdapter(name, new LoraWeights(new Parameter(a.to(Model.Device, copy: true), true), new Parameter(b.to(Model.Device, copy: true), true),
                config.Scaling(key), config.LoraDropout, config.Variant)); // DoRA's magnitude starts as ‖W + s·B·A‖ (its Init)
        }
        _configs[name] = config;
        SetActive(name);
    }

    static void InitLoraWeights(Tensor a, Tensor b, string mode, int r, Generator gen)
    {
        using var scope = NewDisposeScope(); // some in-place ops hand back a fresh wrapper; a and b themselves are not in this scope
        // nn.Linear's default (Kaiming-uniform with a=√5) is U(-1/√fan_in, 1/√fan_in).
        double boundA = 1 / Math.Sqrt(a.shape[1]);
        switch (mode)
        {
            case "true":
                a.uniform_(-boundA, boundA, gen);
                b.zero_();
                break;
            case "gaussian":
                a.normal_(0, 1.0 / r, gen);
                b.zero_();
                break;
            default: // "false": both keep nn.Linear's default init, so the adapter changes outputs from the start
                a.uniform_(-boundA, boundA, gen);
                double boundB = 1 / Math.Sqrt(r);
                b.uniform_(-boundB, boundB, gen);
                break;
        }
    }

    /// <summary>The LoRA wrapper at <paramref name="key"/>, replacing the plain Linear there on first use.</summary>
    LoraLinear Wrap(string key)
    {
        var modules = Model.named_modules().ToDictionary(m => m.name, m => m.module);
        var module = modules[key];
        if (module is LoraLinear existing) return existing;
        int dot = key.LastIndexOf('.');
        if (dot < 0 || modules[key[..dot]] is not ContainerModule parent)
            throw new LoraConfigException($"module '{key}' cannot take a LoRA adapter");
        var wrapped = new LoraLinear((Linear)module) { SlotOf = SlotOf };
        wrapped.train(module.training); // a wrapper starts in the mode of what it wraps (eval after a load: no dropout)
        parent.ReplaceChild(key[(dot + 1)..], wrapped);
        _layers = null;
        return wrapped;
    }

    /// <summary>Makes exactly these adapters active (hot-swap: no weights move).</summary>
    public void SetActive(params string[] names)
    {
        foreach (var n in names)
            if (!_configs.ContainsKey(n)) throw new KeyNotFoundException($"no adapter named '{n}' (loaded: {string.Join(", ", _configs.Keys)})");
        foreach (var (_, layer) in LoraLayers())
        {
            layer.Active.Clear();
            layer.Active.AddRange(names.Where(layer.Adapters.ContainsKey));
        }
    }

    /// <summary>With adapters disabled the model computes exactly the base model (merged adapters are unmerged first).</summary>
    public void SetDisabled(bool disabled)
    {
        foreach (var (_, layer) in LoraLayers())
        {
            if (disabled) layer.UnmergeAll();
            layer.Disabled = disabled;
        }
    }

    /// <summary>Serving: one adapter name (or null for the base) per batch row, for every wrapped layer; null clears.</summary>
    public void SetRowAdapters(string?[]? rows)
    {
        foreach (var (_, layer) in LoraLayers()) layer.RowAdapters = rows;
    }

    readonly Dictionary<string, int> _slots = new(StringComparer.Ordinal);

    /// <summary>
    /// The adapter's serving slot (1, 2, …; the lowest free one on first use, freed when the adapter is deleted): where it
    /// sits in every layer's stacked adapters, so one slot index per token selects it in the whole model.
    /// </summary>
    public int SlotOf(string name)
    {
        if (_slots.TryGetValue(name, out int slot)) return slot;
        slot = 1;
        var taken = _slots.Values.ToHashSet();
        while (taken.Contains(slot)) slot++;
        return _slots[name] = slot;
    }

    /// <summary>Serving: each packed token's adapter slot [N] on the device for every layer (null: from the row adapters' names).</summary>
    public void SetRowSlots(Tensor? slots)
    {
        foreach (var (_, layer) in LoraLayers()) layer.RowSlots = slots;
    }

    /// <summary>
    /// Brings every layer's stacked adapters in line with the loaded ones in <paramref name="dtype"/>; true when any
    /// layer's stack was reallocated (tensors captured in a CUDA graph moved).
    /// </summary>
    public bool SyncStacks(ScalarType dtype)
    {
        var moved = new bool[1];
        foreach (var (_, layer) in LoraLayers()) layer.SyncStack(dtype, Model.Device, moved);
        return moved[0];
    }

    public void DeleteAdapter(string name)
    {
        if (!_configs.Remove(name)) throw new KeyNotFoundException($"no adapter named '{name}'");
        _slots.Remove(name);
        foreach (var (_, layer) in LoraLayers()) layer.RemoveAdapter(name);
    }

    /// <summary>Dropout in every wrapped layer draws from <paramref name="rng"/> (null: torch's global generator).</summary>
    public void UseRng(Runtime.RngStream? rng)
    {
        foreach (var m in Model.modules()) if (m is LoraLinear l) l.Rng = rng;
    }

    /// <summary>
    /// The LoRA side of the training fast path (the model's side is <c>Accelerated.TrainingAccelerator</c>): LoRA branches
    /// in the activations' dtype. Forward values equal the plain path in fp32; in bf16 the LoRA branch rounds its
    /// [tokens, r] intermediate, as PEFT does when the adapter itself is bf16.
    /// </summary>
    public void UseFastTraining(bool on)
    {
        foreach (var m in Model.modules()) if (m is LoraLinear l) l.ComputeInInputDtype = on;
    }

    /// <summary>
    /// The adapter's trainable tensors (A, B and DoRA's magnitude of every wrapped layer) in a stable order, keyed as
    /// PEFT's adapter file names them without its "base_model.model." prefix (…q_proj.lora_A.weight,
    /// …q_proj.lora_magnitude_vector). In the model they are the parameters …q_proj.lora_A.&lt;name&gt;.weight etc.
    /// </summary>
    public List<(string key, Parameter param)> Parameters(string name) => LoraLayers()
        .Where(l => l.layer.Adapters.ContainsKey(name))
        .SelectMany(l => l.layer.Adapters[name].FileTensors().Select(t => ($"{l.key}.{t.Suffix}", t.Tensor)))
        .ToList();

    /// <summary>
    /// The base model's parameters under checkpoint names: wrappers' ".base_layer" dropped, adapter tensors left out
    /// (what a merged export writes).
    /// </summary>
    public IEnumerable<(string name, Parameter param)> BaseParameters()
    {
        var adapterTensors = LoraLayers().SelectMany(l => l.layer.Adapters.Values.SelectMany(w => w.FileTensors().Select(t => t.Tensor.Handle))).ToHashSet();
        return Model.named_parameters().Where(p => !adapterTensors.Contains(p.parameter.Handle))
            .Select(p => (p.name.Replace(".base_layer.", ".", StringComparison.Ordinal), p.parameter));
    }

    /// <summary>PEFT's print_trainable_parameters line for one adapter.</summary>
    public string TrainableReport(string name)
    {
        long trainable = Parameters(name).Sum(p => p.param.numel());
        // Adapters are registered parameters, so the model's own count includes every loaded adapter (a tied LM head counts once).
        long all = Model.parameters().DistinctBy(p => p.Handle).Sum(p => p.numel())
            + Model.modules().OfType<Models.Linear>().Where(l => l.IsQuantized).Sum(l => l.OutFeatures * l.InFeatures); // packed weights count as their values, as PEFT counts Params4bit
        return $"trainable params: {trainable:N0} || all params: {all:N0} || trainable%: {100.0 * trainable / all:F4}";
    }

    /// <summary>
    /// Why the fused training kernels leave an adapter to the reference path (null when they take it): they hand-write
    /// the plain s·B·A·x term and its backward, which a variant such as DoRA is not.
    /// </summary>
    public string? FastTrainingDeclines(string name) =>
        _configs.TryGetValue(name, out var c) && !c.Variant.IsPlainTerm
            ? $"the fused LoRA kernels compute plain LoRA only; {c.Variant.Name} adapter '{name}' runs on the reference path (RMSNorm/SwiGLU kernels still apply)"
            : null;

    public void Merge(params string[] names)
    {
        foreach (var (_, layer) in LoraLayers())
            foreach (var n in names)
                if (layer.Adapters.ContainsKey(n)) layer.Merge(n);
    }

    public void UnmergeAll()
    {
        foreach (var (_, layer) in LoraLayers()) layer.UnmergeAll();
    }

    /// <summary>Registers an adapter whose weights are already placed in the layers (combination, loading).</summary>
    internal void Register(string name, LoraConfig config) => _configs[name] = config;

    internal LoraLinear WrapForLoad(string key) => Wrap(key);

    public void Dispose() => Model.Dispose();
}
