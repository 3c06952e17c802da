using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Lora;

/// <summary>
/// Weighted combination of loaded adapters into a new one, with PEFT's add_weighted_adapter arithmetic:
/// <list type="bullet">
/// <item><c>linear</c> (equal ranks): A = Σ sign·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ</item>
/// <item><c>cat</c>: A = [wᵢsᵢ·Aᵢ] stacked, B = [Bᵢ] side by side (rank = Σ rᵢ)</item>
/// <item><c>svd</c>: Δ = Σ wᵢ·ΔWᵢ (ΔWᵢ = sᵢ·BᵢAᵢ), truncated SVD to the target rank: B = U·S, A = Vᴴ. This is what PEFT 0.21
/// computes (measured against it); older PEFT source multiplied by sᵢ a second time.</item>
/// </list>
/// The new adapter takes the first adapter's config with r = lora_alpha = the new rank, plain scaling (1) and the
/// union of targets. Two deliberate departures from PEFT, both where PEFT misbehaves: ranks come from the actual
/// per-module ranks (PEFT's config-r sizing fails under rank_pattern), and rsLoRA is not inherited (PEFT's result
/// would be scaled by √r).
/// </summary>
public static class AdapterCombiner
{
    /// <summary>Largest |weight| accepted for one adapter in a combination.</summary>
    public const double MaxWeight = 1e3;

    public static LoraConfig Combine(LoraModel lm, IReadOnlyList<string> adapters, IReadOnlyList<double> weights, string newName,
        string method, int? svdRank = null)
    {
        if (adapters.Count == 0) throw new ArgumentException("no adapters to combine");
        if (adapters.Count != weights.Count) throw new ArgumentException($"{weights.Count} weights for {adapters.Count} adapters; give one weight per adapter");
        for (int i = 0; i < weights.Count; i++)
            if (!double.IsFinite(weights[i]) || Math.Abs(weights[i]) > MaxWeight)
                throw new ArgumentException($"weight {weights[i]} of adapter '{adapters[i]}' must be a finite number between -{MaxWeight:G} and {MaxWeight:G}");
        if (method is not ("linear" or "cat" or "svd")) throw new ArgumentException($"unknown combination method '{method}' (linear, cat or svd)");
        if (method != "svd" && svdRank is not null) throw new ArgumentException("a target rank applies to the svd method only");
        if (lm.Configs.ContainsKey(newName)) throw new ArgumentException($"an adapter named '{newName}' already exists");
        var configs = adapters.Select(a => lm.Configs.TryGetValue(a, out var c) ? c : throw new KeyNotFoundException($"no adapter named '{a}'")).ToList();
        // PEFT's add_weighted_adapter combines only A and B: the result keeps use_dora but its magnitude is a fresh
        // initialisation (‖W + s·B₀·A₀‖ with the init's B₀), not a combination of the adapters' magnitudes, so its output
        // depends on init_lora_weights rather than on the adapters. LoraKit refuses rather than reproduce that.
        if (adapters.FirstOrDefault(a => !lm.Configs[a].Variant.IsPlainTerm) is { } variantAdapter)
            throw new ArgumentException($"adapter '{variantAdapter}' is a {lm.Configs[variantAdapter].Variant.Name} adapter; combining supports plain LoRA only " +
                "(PEFT's add_weighted_adapter would combine A and B but not the DoRA magnitudes)");
        // PEFT sizes the result from the configs' r, which breaks (shape error) under rank_pattern; the largest rank an
        // adapter actually has on any module is the same number without patterns and also works with them.
        var maxRanks = adapters.Select(a => lm.LoraLayers().Where(l => l.layer.Adapters.ContainsKey(a)).Max(l => l.layer.Adapters[a].Rank)).ToList();
        bool uniform = lm.LoraLayers().All(l => adapters.Where(l.layer.Adapters.ContainsKey).Select(a => l.layer.Adapters[a].Rank).Distinct().Count() <= 1)
            && maxRanks.Distinct().Count() == 1
            && lm.LoraLayers().All(l => adapters.Where(l.layer.Adapters.ContainsKey).All(a => l.layer.Adapters[a].Rank == maxRanks[0]));
        int newRank = method switch
        {
            "linear" => uniform ? maxRanks[0] : throw new ArgumentException("linear combination needs every adapter to have one rank on every module; use cat or svd"),
            "cat" => maxRanks.Sum(),
            "svd" => svdRank ?? maxRanks.Max(),
            _ => throw new ArgumentException($"unknown combination method '{method}' (linear, cat or svd)"),
        };
        if (newRank <= 0) throw new ArgumentException($"the combined rank must be positive (got {newRank})");
        bool regex = configs[0].TargetRegex is not null;
        if (configs.Any(c => (c.TargetRegex is not null) != regex))
            throw new ArgumentException("cannot combine adapters whose target_modules mix a regex and a list");
        var newConfig = configs[0] with
        {
            // PEFT keeps the first adapter's use_rslora, which would scale the result by √r; alpha = r with plain
            // scaling gives the intended Σ wᵢΔWᵢ, and PEFT reads it back the same.
            R = newRank, LoraAlpha = newRank, UseRslora = false, RankPattern = new Dictionary<string, int>(), AlphaPattern = new Dictionary<string, double>(),
            TargetRegex = regex ? string.Join("|", configs.Select(c => $"({c.TargetRegex})")) : null,
            TargetModules = regex ? null : configs.SelectMany(c => c.TargetModules!).Distinct().ToList(),
        };

        using var _ = no_grad();
        // Targets only (rank 1): an absurd rank must fail on the layers' size below, not as an implausible lora_alpha.
        var keys = lm.TargetKeys(newConfig with { R = 1, LoraAlpha = 1 });
        // A rank above min(in, out) of a layer cannot add anything (svd has no more singular values; cat's extra rows are
        // linearly dependent) but would be allocated and written on every layer.
        long maxRank = keys.Min(k => Math.Min(lm.LinearShapes[k].InFeatures, lm.LinearShapes[k].OutFeatures));
        if (newRank > maxRank)
            throw new ArgumentException($"the combined rank {newRank} exceeds {maxRank}, the smallest min(in, out) of the targeted layers" +
                (method == "svd" ? "" : $"; use svd with a rank of at most {maxRank}"));
        foreach (var key in keys)
        {
            var layer = lm.WrapForLoad(key);
            long inF = layer.base_layer.InFeatures, outF = layer.base_layer.OutFeatures;
            var present = adapters.Select((a, i) => (a, w: weights[i])).Where(p => layer.Adapters.ContainsKey(p.a)).ToList();
            var a = zeros(newRank, inF, ScalarType.Float32, lm.Model.Device);
            var b = zeros(outF, newRank, ScalarType.Float32, lm.Model.Device);
            if (present.Count > 0)
            {
                using var scope = NewDisposeScope();
                switch (method)
                {
                    case "cat":
                    {
                        var catA = cat(present.Select(p => layer.Adapters[p.a].A.Times(p.w * layer.Adapters[p.a].Scaling)).ToArray(), 0);
                        var catB = cat(present.Select(p => (Tensor)layer.Adapters[p.a].B).ToArray(), 1);
                        a[..(int)catA.shape[0]] = catA;
                        b[.., ..(int)catB.shape[1]] = catB;
                        break;
                    }
                    case "linear":
                        foreach (var (name, w) in present)
                        {
                            double ws = w * layer.Adapters[name].Scaling;
                            a.PlusInPlace(layer.Adapters[name].A.Times(Math.Sqrt(Math.Abs(ws)) * Math.Sign(ws == 0 ? 1 : ws)));
                            b.PlusInPlace(layer.Adapters[name].B.Times(Math.Sqrt(Math.Abs(ws))));
                        }
                        break;
                    case "svd":
                    {
                        var delta = zeros(outF, inF, ScalarType.Float32, lm.Model.Device);
                        foreach (var (name, w) in present) delta.PlusInPlace(layer.DeltaWeight(name).Times(w));
                        var (u, s, vh) = linalg.svd(delta, fullMatrices: true);
                        int k = (int)Math.Min(newRank, s.shape[0]);
                        b[.., ..k] = u[.., ..k].matmul(diag(s[..k]));
                        a[..k] = vh[..k];
                        break;
                    }
                }
            }
            layer.AddAdapter(newName, new LoraWeights(new Parameter(a, true), new Parameter(b, true), newConfig.Scaling(key), newConfig.LoraDropout));
        }
        lm.Register(newName, newConfig);
        return newConfig;
    }
}
