using System.Text;
using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// Adapters under attack (issue 16): every adapter_config.json field × wrong values, the file itself mangled, the
/// safetensors weights mutated (missing, extra, transposed, wrong dtype, non-finite, truncated, foreign base), and
/// combine's arguments. Each case must load correctly or fail with one clean line, in bounded time, without touching
/// the fixture it was copied from. Adapters are read in-process against one loaded base (AdapterFiles.Read does not
/// modify the model), so hundreds of cases take seconds.
/// </summary>
public class FuzzAdapterTests
{
    const string Area = "adapter";
    static readonly Lazy<LoraModel> Llama = new(() => new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU)));
    static string Source => Fixtures.Path_("adapters", "llama", "a");

    /// <summary>Reads the adapter in <paramref name="dir"/> against the llama base; on success the result must be sane.</summary>
    static void ReadAndCheck(string dir)
    {
        using var p = AdapterFiles.Read(Llama.Value, dir, new AdapterLoadOptions { Warn = null });
        p.Config.Validate();
        foreach (var (key, w) in p.Weights)
        {
            var (a, b) = w;
            Assert.True(a.isfinite().all().item<bool>() && b.isfinite().all().item<bool>(), $"{key}: non-finite weights accepted");
            var (inF, outF) = Llama.Value.LinearShapes[key];
            Assert.Equal(p.Config.UseDora, w.Magnitude is not null);
            if (w.Magnitude is { } m) Assert.True(m.isfinite().all().item<bool>() && m.shape.SequenceEqual([outF]), $"{key}: bad DoRA magnitude accepted");
            Assert.Equal(inF, a.shape[1]);
            Assert.Equal(outF, b.shape[0]);
            Assert.True(a.shape[0] <= Math.Min(inF, outF));
        }
    }

    // ---- adapter_config.json: every field × wrong values ----

    static readonly (string Name, Func<JsonNode?> Value)[] Mutations =
    [
        ("null", () => null), ("true", () => true), ("false", () => false), ("0", () => 0), ("-1", () => -1), ("1", () => 1),
        ("2.5", () => 2.5), ("1e20", () => 1e20), ("-1e20", () => -1e20), ("2^31", () => 2147483648L), ("1e308", () => 1e308),
        ("empty string", () => ""), ("'x'", () => "x"), ("'all-linear'", () => "all-linear"), ("redos", () => "(a+)+$"),
        ("bad regex", () => "(["), ("'4'", () => "4"), ("[]", () => new JsonArray()), ("[null]", () => new JsonArray((JsonNode?)null)),
        ("[1,'x']", () => new JsonArray(1, "x")), ("['q_proj']", () => new JsonArray("q_proj")), ("[99]", () => new JsonArray(99)),
        ("[-1]", () => new JsonArray(-1)), ("{}", () => new JsonObject()), ("{q_proj:'x'}", () => new JsonObject { ["q_proj"] = "x" }),
        ("{q_proj:-3}", () => new JsonObject { ["q_proj"] = -3 }), ("{q_proj:1e9}", () => new JsonObject { ["q_proj"] = 1e9 }),
        ("{'(':2}", () => new JsonObject { ["("] = 2 }), ("{(.*)*x:2}", () => new JsonObject { ["(.*)*x"] = 2 }),
        ("{q_proj:null}", () => new JsonObject { ["q_proj"] = null }), ("{q_proj:[1]}", () => new JsonObject { ["q_proj"] = new JsonArray(1) }),
        ("nested", () => JsonNode.Parse(new string('[', 40) + new string(']', 40))),
    ];

    static readonly string[] KnownFields =
    [
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "init_lora_weights",
        "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "modules_to_save",
        "base_model_name_or_path", "task_type", "peft_type", "use_dora", "fan_in_fan_out", "lora_bias", "auto_mapping", "unknown_field",
    ];

    [Fact]
    public void EveryConfigFieldWithWrongValues()
    {
        var fixtureBefore = FuzzContract.Snapshot(Source);
        var dir = Fixtures.CopyOf(Source);
        var path = Path.Combine(dir, AdapterFiles.ConfigFile);
        var original = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        var rng = FuzzContract.Rng("adapter-config-fields");
        var otherFields = original.Select(kv => kv.Key).Except(KnownFields).ToList();
        int cases = 0;
        foreach (var field in KnownFields.Concat(otherFields))
        {
            bool known = KnownFields.Contains(field);
            var mutations = new List<(string, Func<JsonNode?>?)> { ("delete", null) };
            // Fields LoraKit reads get every mutation; the ones it passes through get a sample (all under --fuzz).
            mutations.AddRange(Mutations.Where(_ => known || FuzzContract.Scale > 1 || rng.Next(6) == 0).Select(m => (m.Name, (Func<JsonNode?>?)m.Value)));
            foreach (var (name, value) in mutations)
            {
                var o = (JsonObject)original.DeepClone();
                if (value is null) o.Remove(field); else o[field] = value();
                File.WriteAllText(path, o.ToJsonString());
                var e = FuzzContract.Check(Area, $"config {field} = {name}", () => ReadAndCheck(dir));
                cases++;
                // Values that must never be accepted.
                if (field is "r" && name is "0" or "-1" or "2^31" or "1e20" or "'x'" or "true") Assert.NotNull(e);
                if (field is "lora_alpha" && name is "0" or "-1" or "1e20" or "1e308") Assert.NotNull(e);
                if (field is "lora_dropout" && name is "-1" or "1" or "2.5") Assert.NotNull(e);
                if (field is "peft_type" && name != "delete") Assert.NotNull(e);
            }
        }
        Assert.True(cases > 300, $"{cases} cases");
        FuzzContract.AssertUntouched(fixtureBefore, Source, "fixture adapter");
    }

    [Fact]
    public void MangledConfigFiles()
    {
        var dir = Fixtures.CopyOf(Source);
        var path = Path.Combine(dir, AdapterFiles.ConfigFile);
        var bytes = File.ReadAllBytes(Path.Combine(Source, AdapterFiles.ConfigFile));
        var rng = FuzzContract.Rng("adapter-config-bytes");
        var inputs = new List<(string, byte[])>();
        int step = Math.Max(1, 12 / FuzzContract.Scale);
        for (int n = 0; n < bytes.Length; n += step) inputs.Add(($"truncated at {n}", bytes[..n]));
        for (int i = 0; i < 40 * FuzzContract.Scale; i++)
        {
            var b = (byte[])bytes.Clone();
            int at = rng.Next(b.Length);
            b[at] = (byte)rng.Next(256);
            inputs.Add(($"byte {at} = {b[at]}", b));
        }
        string text = Encoding.UTF8.GetString(bytes);
        inputs.Add(("invalid UTF-8", [.. bytes[..20], 0xC3, 0x28, 0xFF, .. bytes[20..]]));
        inputs.Add(("BOM", [0xEF, 0xBB, 0xBF, .. bytes]));
        inputs.Add(("duplicate r", Encoding.UTF8.GetBytes(text.Replace("\"r\": 4", "\"r\": 4, \"r\": 64"))));
        inputs.Add(("top-level array", "[1, 2]"u8.ToArray()));
        inputs.Add(("top-level null", "null"u8.ToArray()));
        inputs.Add(("top-level number", "5"u8.ToArray()));
        inputs.Add(("deep nesting", Encoding.UTF8.GetBytes("{\"x\": " + new string('[', 100_000) + new string(']', 100_000) + "}")));
        inputs.Add(("2 MB of spaces", [.. bytes, .. Enumerable.Repeat((byte)' ', 2 << 20)]));
        inputs.Add(("NaN literal", Encoding.UTF8.GetBytes(text.Replace("\"lora_alpha\": 8", "\"lora_alpha\": NaN"))));
        inputs.Add(("comment", Encoding.UTF8.GetBytes("// hi\n" + text)));
        inputs.Add(("empty", []));
        foreach (var (name, content) in inputs)
        {
            File.WriteAllBytes(path, content);
            FuzzContract.Check(Area, $"config file {name}", () => ReadAndCheck(dir));
        }
    }

    // ---- adapter_model.safetensors ----

    static Dictionary<string, Tensor> ReadAll(string file)
    {
        using var f = SafetensorsFile.Open(file);
        return f.Entries.Keys.ToDictionary(k => k, f.Read);
    }

    [Fact]
    public void MutatedWeights()
    {
        var fixtureBefore = FuzzContract.Snapshot(Source);
        var dir = Fixtures.CopyOf(Source);
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        var original = ReadAll(path);
        var rng = FuzzContract.Rng("adapter-weights");
        var keys = original.Keys.Order(StringComparer.Ordinal).ToList();
        var chosen = FuzzContract.Scale > 1 ? keys : keys.OrderBy(_ => rng.Next()).Take(6).ToList();
        var cases = new List<(string Name, Action<Dictionary<string, Tensor>> Edit, bool MustFail)>();
        foreach (var k in chosen)
        {
            cases.Add(($"{k} missing", t => t.Remove(k), true));
            cases.Add(($"{k} transposed", t => t[k] = t[k].t().contiguous(), true));
            cases.Add(($"{k} as I64", t => t[k] = t[k].to(ScalarType.Int64), true));
            cases.Add(($"{k} as BOOL", t => t[k] = t[k].ne(0), true));
            cases.Add(($"{k} as F16", t => t[k] = t[k].to(ScalarType.Float16), false));
            cases.Add(($"{k} as BF16", t => t[k] = t[k].to(ScalarType.BFloat16), false));
            cases.Add(($"{k} one row more", t => t[k] = cat([t[k], t[k][..1]], 0), true));
            cases.Add(($"{k} flattened", t => t[k] = t[k].flatten(), true));
            cases.Add(($"{k} empty", t => t[k] = empty(0, t[k].shape[1]), true));
            cases.Add(($"{k} renamed", t => { t[k.Replace("lora_", "lora_X")] = t[k]; t.Remove(k); }, true));
            foreach (var bad in new[] { float.NaN, float.PositiveInfinity, float.NegativeInfinity, 1e38f, -3e7f })
                cases.Add(($"{k} with {bad}", t =>
                {
                    var c = t[k].clone();
                    c.view(-1)[rng.Next((int)c.numel())] = tensor(bad);
                    t[k] = c;
                }, true));
        }
        cases.Add(("extra unrelated tensor", t => t["base_model.model.model.layers.0.self_attn.q_proj.weight"] = zeros(64, 64), true));
        cases.Add(("extra untargeted module", t =>
        {
            t["base_model.model.lm_head.lora_A.weight"] = zeros(4, 64);
            t["base_model.model.lm_head.lora_B.weight"] = zeros(400, 4);
        }, true));
        cases.Add(("extra layer 7", t =>
        {
            t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = zeros(4, 64);
            t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = zeros(64, 4);
        }, true));
        cases.Add(("no tensors", t => t.Clear(), true));
        cases.Add(("every tensor transposed", t => { foreach (var k in t.Keys.ToList()) t[k] = t[k].t().contiguous(); }, true));
        cases.Add(("unchanged", _ => { }, false));
        foreach (var (name, edit, mustFail) in cases)
        {
            var t = new Dictionary<string, Tensor>(original);
            edit(t);
            SafetensorsWriter.Save(path, t);
            var e = FuzzContract.Check(Area, $"weights {name}", () => ReadAndCheck(dir));
            Assert.True(mustFail == (e != null), $"{name}: {(mustFail ? "accepted" : e?.Message)}");
        }
        FuzzContract.AssertUntouched(fixtureBefore, Source, "fixture adapter");
    }

    [Fact]
    public void TruncatedAndForeignWeightFiles()
    {
        var dir = Fixtures.CopyOf(Source);
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        var bytes = File.ReadAllBytes(Path.Combine(Source, AdapterFiles.WeightsFile));
        long headerLen = BitConverter.ToInt64(bytes, 0);
        using var f = SafetensorsFile.Open(Path.Combine(Source, AdapterFiles.WeightsFile));
        // Structural offsets: inside the length, around the header's end, every tensor boundary.
        var offsets = new SortedSet<long> { 0, 1, 7, 8, 9, 8 + headerLen / 2, 8 + headerLen - 1, 8 + headerLen, bytes.Length - 1 };
        foreach (var e in f.Entries.Values.Where((_, i) => FuzzContract.Scale > 1 || i % 4 == 0))
        {
            offsets.Add(8 + headerLen + e.Begin);
            offsets.Add(8 + headerLen + e.End - 1);
        }
        foreach (var n in offsets.Where(n => n < bytes.Length))
        {
            File.WriteAllBytes(path, bytes[..(int)n]);
            var ex = FuzzContract.Check(Area, $"weights truncated at {n}", () => ReadAndCheck(dir));
            Assert.NotNull(ex);
        }
        // Metadata naming another base (or garbage) is refused by fingerprint; the same base passes.
        var tensors = ReadAll(Path.Combine(Source, AdapterFiles.WeightsFile));
        foreach (var (name, fp, ok) in new[] { ("garbage fingerprint", "x", false), ("empty fingerprint", "", false), ("other base", new string('0', 64), false),
                     ("this base", Llama.Value.Model.Fingerprint!, true), ("this base upper-case", Llama.Value.Model.Fingerprint!.ToUpperInvariant(), true) })
        {
            SafetensorsWriter.Save(path, tensors, new Dictionary<string, string> { [BaseFingerprint.MetadataKey] = fp, [BaseFingerprint.ModelTypeKey] = "\n\u0000" });
            var ex = FuzzContract.Check(Area, $"weights metadata {name}", () => ReadAndCheck(dir));
            Assert.True(ok == (ex is null), name);
        }
    }

    // ---- DoRA: the magnitude tensors and the use_dora flag ----

    static string DoraSource => Fixtures.Path_("adapters", "llama", "dora_lorakit");

    [Fact]
    public void MutatedDoraWeightsAndFlag()
    {
        var fixtureBefore = FuzzContract.Snapshot(DoraSource);
        var dir = Fixtures.CopyOf(DoraSource);
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        var configPath = Path.Combine(dir, AdapterFiles.ConfigFile);
        var originalConfig = File.ReadAllText(configPath);
        var original = ReadAll(path);
        var rng = FuzzContract.Rng("adapter-dora");
        var magnitudes = original.Keys.Where(k => k.EndsWith("." + DoraVariant.MagnitudeSuffix, StringComparison.Ordinal)).Order(StringComparer.Ordinal).ToList();
        Assert.NotEmpty(magnitudes);
        var chosen = FuzzContract.Scale > 1 ? magnitudes : magnitudes.OrderBy(_ => rng.Next()).Take(4).ToList();
        var cases = new List<(string Name, Action<Dictionary<string, Tensor>> Edit, JsonNode? UseDora, bool MustFail)>();
        foreach (var k in chosen)
        {
            cases.Add(($"{k} missing", t => t.Remove(k), true, true));
            cases.Add(($"{k} one more", t => t[k] = cat([t[k], t[k][..1]], 0), true, true));
            cases.Add(($"{k} as a row", t => t[k] = t[k].unsqueeze(0), true, true));
            cases.Add(($"{k} empty", t => t[k] = empty(0), true, true));
            cases.Add(($"{k} as I64", t => t[k] = t[k].to(ScalarType.Int64), true, true));
            cases.Add(($"{k} as F16", t => t[k] = t[k].to(ScalarType.Float16), true, false));
            cases.Add(($"{k} with .weight", t => { t[k + ".weight"] = t[k]; t.Remove(k); }, true, true));
            foreach (var bad in new[] { float.NaN, float.PositiveInfinity, float.NegativeInfinity, 1e38f })
                cases.Add(($"{k} with {bad}", t =>
                {
                    var c = t[k].clone();
                    c.view(-1)[rng.Next((int)c.numel())] = tensor(bad);
                    t[k] = c;
                }, true, true));
        }
        foreach (var (name, flag) in new (string, JsonNode?)[] { ("false", false), ("null", null), ("'true'", "true"), ("1", 1), ("[]", new JsonArray()), ("{}", new JsonObject()) })
            cases.Add(($"use_dora {name} with magnitudes", _ => { }, flag, true));
        cases.Add(("use_dora false without magnitudes", t => { foreach (var k in magnitudes) t.Remove(k); }, false, false));
        cases.Add(("use_dora true without magnitudes", t => { foreach (var k in magnitudes) t.Remove(k); }, true, true));
        cases.Add(("unchanged", _ => { }, true, false));
        foreach (var (name, edit, useDora, mustFail) in cases)
        {
            var t = new Dictionary<string, Tensor>(original);
            edit(t);
            SafetensorsWriter.Save(path, t);
            var o = JsonNode.Parse(originalConfig)!.AsObject();
            o["use_dora"] = useDora?.DeepClone();
            File.WriteAllText(configPath, o.ToJsonString());
            var e = FuzzContract.Check(Area, $"DoRA {name}", () => ReadAndCheck(dir));
            Assert.True(mustFail == (e != null), $"{name}: {(mustFail ? "accepted" : e?.Message)}");
        }
        FuzzContract.AssertUntouched(fixtureBefore, DoraSource, "fixture DoRA adapter");
    }

    // ---- combine ----

    [Fact]
    public void CombineArguments()
    {
        using var lm = new LoraModel(CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU));
        foreach (var adapter in new[] { "a", "b", "c" }) AdapterFiles.Load(lm, adapter, Fixtures.Path_("adapters", "llama", adapter));
        double[] weights = [double.NaN, double.PositiveInfinity, double.NegativeInfinity, 1e308, -1e308, 1e3, 1001, -0.5, 0, 1e-320, 0.7];
        string[] methods = ["linear", "cat", "svd", "", "SVD", "sum", "cat "];
        int?[] ranks = [null, 0, -1, 1, 4, 32, 33, 100000, int.MaxValue];
        string[][] sets = [["a", "b"], ["a", "c"], ["a"], ["a", "nope"], []];
        var rng = FuzzContract.Rng("adapter-combine");
        int n = 0;
        for (int i = 0; i < 120 * FuzzContract.Scale; i++)
        {
            var set = sets[rng.Next(sets.Length)];
            var w = set.Select(_ => weights[rng.Next(weights.Length)]).ToList();
            if (rng.Next(10) == 0) w.Add(1); // one weight too many
            string method = methods[rng.Next(methods.Length)];
            int? rank = ranks[rng.Next(ranks.Length)];
            string name = $"combo{n++}";
            var e = FuzzContract.Check(Area, $"combine [{string.Join(",", set)}] w=[{string.Join(",", w)}] {method} rank {rank}", () =>
            {
                AdapterCombiner.Combine(lm, set, w, name, method, rank);
                foreach (var (key, p) in lm.Parameters(name)) Assert.True(p.isfinite().all().item<bool>(), $"{key} not finite");
            });
            if (w.Any(x => !double.IsFinite(x) || Math.Abs(x) > AdapterCombiner.MaxWeight) || rank is > 32) Assert.NotNull(e);
            if (e is null) lm.DeleteAdapter(name);
            else Assert.False(lm.Configs.ContainsKey(name), "a failed combine left an adapter behind");
        }
    }

    [Fact]
    public void CliCombineAndScoreTouchNothingOutsideTheOutput()
    {
        var root = Fixtures.TempDir();
        var bystander = Path.Combine(root, "bystander.txt");
        File.WriteAllText(bystander, "keep me");
        var nanAdapter = Fixtures.CopyOf(Source, Path.Combine(root, "nan"));
        var t = ReadAll(Path.Combine(Source, AdapterFiles.WeightsFile));
        var k = t.Keys.First();
        t[k] = t[k].clone();
        t[k][0, 0] = tensor(float.NaN);
        SafetensorsWriter.Save(Path.Combine(nanAdapter, AdapterFiles.WeightsFile), t);
        Fixtures.CopyOf(Source, Path.Combine(root, "run", "adapter"));
        var before = FuzzContract.Snapshot(root);
        var fixtures = FuzzContract.Snapshot(Fixtures.Path_("adapters", "llama"));
        string a = Fixtures.Path_("adapters", "llama", "a"), b = Fixtures.Path_("adapters", "llama", "b");
        var cases = new (string Name, string[] Args)[]
        {
            ("combine svd rank 100000", ["combine", "--model", Fixtures.Model("llama"), "--adapters", $"{a}:0.7,{b}:0.3", "--method", "svd", "--svd-rank", "100000", "--output", Path.Combine(root, "o2")]),
            ("score nan adapter", ["score", "--model", Fixtures.Model("llama"), "--adapter", nanAdapter, "--text", "hi", "--device", "cpu"]),
            ("generate run folder", ["generate", "--model", Fixtures.Model("llama"), "--adapter", Path.Combine(root, "run"), "--prompt", "hi", "--device", "cpu"]),
            ("combine nan adapter", ["combine", "--model", Fixtures.Model("llama"), "--adapters", $"{nanAdapter}:1", "--output", Path.Combine(root, "o3")]),
            ("combine weight nan", ["combine", "--model", Fixtures.Model("llama"), "--adapters", $"{a}:nan,{b}:1", "--output", Path.Combine(root, "o1")]),
        };
        // Each CLI case is a process (~3 s here); the in-process tests above cover the same inputs, so ./test runs three.
        foreach (var (name, args) in cases.Take(FuzzContract.Scale > 1 ? cases.Length : 3))
        {
            var (code, _, stderr) = CliTests.RunCli(args);
            FuzzContract.CheckCli(Area, $"cli {name}", code, stderr);
            Assert.Equal(1, code);
        }
        foreach (var o in new[] { "o1", "o2", "o3" })
            Assert.False(Directory.Exists(Path.Combine(root, o)) && Directory.EnumerateFileSystemEntries(Path.Combine(root, o)).Any(), $"{o} written");
        FuzzContract.AssertUntouched(before, root, "temp root");
        FuzzContract.AssertUntouched(fixtures, Fixtures.Path_("adapters", "llama"), "fixture adapters");
    }
}
