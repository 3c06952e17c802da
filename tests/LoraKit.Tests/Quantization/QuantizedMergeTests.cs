using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Quantization;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Quantization;

/// <summary>
/// Merge done right for adapters trained on a quantized base (issue 20; the peft#2105 / transformers#31293 pitfall):
/// `lorakit merge` on real files. The expected weights are computed here independently — the original checkpoint's
/// tensors, bnb's round trip by <see cref="Blockwise4Bit"/>, the adapter's delta scaling·B·A from its own file — and the
/// plain original+delta merge is tied to PEFT's merge_and_unload logits. The printed/recorded logit differences are
/// recomputed from the written outputs.
/// </summary>
public class QuantizedMergeTests
{
    static string Llama => Fixtures.Model("llama");
    static string Nf4 => Fixtures.Path_("reference", "quant", "llama-nf4");
    static string AdapterA => Fixtures.Path_("adapters", "llama", "a");
    static readonly BnbQuantizeOptions Record = new("nf4", DoubleQuant: true, Blocksize: 64);

    /// <summary>A copy of an adapter whose safetensors metadata carries <paramref name="record"/> as lorakit_quantization.</summary>
    static string WithRecord(string adapter, BnbQuantizeOptions record)
    {
        var dir = Fixtures.CopyOf(adapter);
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        Dictionary<string, Tensor> tensors;
        Dictionary<string, string> meta;
        using (var f = SafetensorsFile.Open(path))
        {
            tensors = f.Entries.Keys.ToDictionary(k => k, k => f.Read(k));
            meta = f.Metadata.ToDictionary(kv => kv.Key, kv => kv.Value);
        }
        meta[BnbQuantizeOptions.AdapterMetadataKey] = record.ToJson();
        SafetensorsWriter.Save(path, tensors, meta);
        return dir;
    }

    /// <summary>scaling·B·A per base weight key, from the adapter's own files (plain LoRA, one rank and alpha).</summary>
    static Dictionary<string, Tensor> Deltas(string adapter)
    {
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(adapter, "adapter_config.json")))!;
        Assert.False(cfg["use_rslora"]?.GetValue<bool>() ?? false);
        Assert.True(cfg["rank_pattern"] is null or JsonObject { Count: 0 } && cfg["alpha_pattern"] is null or JsonObject { Count: 0 });
        double scaling = cfg["lora_alpha"]!.GetValue<double>() / cfg["r"]!.GetValue<double>();
        using var f = SafetensorsFile.Open(Path.Combine(adapter, AdapterFiles.WeightsFile));
        var deltas = new Dictionary<string, Tensor>();
        foreach (var key in f.Entries.Keys.Where(k => k.EndsWith(".lora_A.weight", StringComparison.Ordinal)))
        {
            var module = key["base_model.model.".Length..^".lora_A.weight".Length];
            var a = f.Read(key).to(ScalarType.Float32);
            var b = f.Read(key.Replace(".lora_A.", ".lora_B.")).to(ScalarType.Float32);
            deltas[module + ".weight"] = b.matmul(a).mul(scaling);
        }
        Assert.NotEmpty(deltas);
        return deltas;
    }

    /// <summary>The decoder's linear weights: what bnb quantizes (not embeddings, norms or lm_head).</summary>
    static bool Quantizable(string key) => key.Contains(".layers.") && key.EndsWith("_proj.weight", StringComparison.Ordinal);

    static Tensor NfRoundTrip(Tensor w)
    {
        using var q = Blockwise4Bit.Quantize(w, "nf4", 64, doubleQuant: true);
        return Blockwise4Bit.Dequantize(q);
    }

    /// <summary>Checks every tensor of <paramref name="outDir"/> equals base(key) (+ delta where the adapter has one).</summary>
    static void AssertWeights(string outDir, Func<string, Tensor> baseOf, Dictionary<string, Tensor> deltas, string what)
    {
        using var outFiles = CheckpointFiles.Open(outDir);
        using var orig = CheckpointFiles.Open(Llama);
        Assert.Equal(orig.Names.Order(StringComparer.Ordinal), outFiles.Names.Order(StringComparer.Ordinal));
        foreach (var key in orig.Names)
        {
            using var scope = NewDisposeScope();
            var expected = baseOf(key);
            if (deltas.TryGetValue(key, out var d)) expected = expected + d;
            var actual = outFiles.Read(key, ScalarType.Float32, CPU);
            Assert.True(QuantFormatTests.Same(actual, expected), $"{what}: {key} differs (rel {Close.RelError(actual, expected):E2})");
        }
    }

    static JsonNode Provenance(string outDir) => JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "config.json")))!["lorakit_merge"]!;

    static Tensor ProbeLogits(string modelDir, string text)
    {
        var ids = Tokenizer.Load(Llama).Encode(text).Select(i => (long)i).ToArray();
        using var m = CausalLM.Load(modelDir, ScalarType.Float32, CPU);
        using var _ = no_grad();
        return m.Logits(tensor(ids).unsqueeze(0), null, null)[0].to(ScalarType.Float64);
    }

    /// <summary>The recorded difference equals max/mean |Δ| of the two outputs' fp32 logits, and the printed line shows it.</summary>
    static void AssertMeasured(JsonNode? recorded, string refDir, string otherDir, string text, string stdout)
    {
        Assert.NotNull(recorded);
        using var scope = NewDisposeScope();
        var r = ProbeLogits(refDir, text);
        var d = (ProbeLogits(otherDir, text) - r).abs();
        double max = d.max().item<double>(), mean = d.mean().item<double>(), rel = max / r.abs().max().item<double>();
        Assert.True(max > 1e-3, $"the two merges should differ on the probe text (max |Δ| {max})");
        foreach (var (name, expected) in new[] { ("max_abs", max), ("mean_abs", mean), ("relative", rel) })
        {
            double got = recorded![name]!.GetValue<double>();
            Assert.True(Math.Abs(got - expected) <= 1e-5 * Math.Abs(expected), $"{name}: recorded {got}, computed from the outputs {expected}");
        }
        Assert.Contains(FormattableString.Invariant($"max |Δlogit| {recorded!["max_abs"]!.GetValue<double>():G4}, mean |Δlogit| {recorded["mean_abs"]!.GetValue<double>():G4}"), stdout);
    }

    static (int code, string stdout, string stderr) Merge(params string[] args) =>
        CliTests.RunCli(["merge", "--no-gate", .. args]);

    [Fact]
    public void DefaultMergesIntoTheDequantizedBaseAndOriginalIntoTheFullPrecisionWeights()
    {
        var adapter = WithRecord(AdapterA, Record);
        var deltas = Deltas(adapter);
        var tmp = Fixtures.TempDir();
        string dq = Path.Combine(tmp, "dq"), orig = Path.Combine(tmp, "orig");
        var (code, stdout, stderr) = Merge("--model", Llama, "--adapter", adapter, "--output", dq, "--dtype", "fp32");
        Assert.True(code == 0, stderr);
        Assert.Contains("the dequantized base (default", stdout);
        using var original = CheckpointFiles.Open(Llama);
        Tensor Original(string key) => original.Read(key, ScalarType.Float32, CPU);
        AssertWeights(dq, k => Quantizable(k) ? NfRoundTrip(Original(k)) : Original(k), deltas, "default merge");

        (code, var stdout2, stderr) = Merge("--model", Llama, "--adapter", adapter, "--output", orig, "--dtype", "fp32", "--merge-base", "original");
        Assert.True(code == 0, stderr);
        AssertWeights(orig, Original, deltas, "--merge-base original");
        // original + delta is PEFT's merge_and_unload (the same delta path every LoraKit merge uses).
        var text = Fixtures.Json("reference", "peft_llama.json").GetProperty("texts")[0];
        using (var m = CausalLM.Load(orig, ScalarType.Float32, CPU))
        using (no_grad())
        {
            var logits = m.Logits(tensor(Fixtures.Ids(text.GetProperty("input_ids"))).unsqueeze(0), null, null)[0];
            Assert.True(Close.RelError(logits, Fixtures.ReferenceTensor("peft_llama", "merged_a_0")) <= 1e-4, "original + delta vs PEFT merged");
        }

        var p = Provenance(dq)["quantization"]!;
        Assert.Equal("dequantized", p["merge_base"]!.GetValue<string>());
        Assert.Equal("nf4", p["trained_on_quantization"]!["method"]!.GetValue<string>());
        Assert.Equal("original", Provenance(orig)["quantization"]!["merge_base"]!.GetValue<string>());
        string probe = p["probe"]!["text"]!.GetValue<string>();
        Assert.Equal(LogitDifference.DefaultProbeText, probe);
        AssertMeasured(p["probe"]!["merge_base_difference"], dq, orig, probe, stdout);
        AssertMeasured(Provenance(orig)["quantization"]!["probe"]!["merge_base_difference"], dq, orig, probe, stdout2);
    }

    [Fact]
    public void DefaultIsWrittenInBf16AndTheProbeTextCanBeChosen()
    {
        var adapter = WithRecord(AdapterA, Record);
        var tmp = Fixtures.TempDir();
        string dq = Path.Combine(tmp, "dq"), orig = Path.Combine(tmp, "orig");
        const string text = "A different probe: counting one two three.";
        var (code, stdout, stderr) = Merge("--model", Llama, "--adapter", adapter, "--output", dq, "--probe-text", text);
        Assert.True(code == 0, stderr);
        (code, _, stderr) = Merge("--model", Llama, "--adapter", adapter, "--output", orig, "--probe-text", text, "--merge-base", "original");
        Assert.True(code == 0, stderr);
        using (var f = CheckpointFiles.Open(dq)) Assert.Equal("BF16", f.Entry("model.layers.0.self_attn.q_proj.weight").DType);
        Assert.Equal("bfloat16", JsonNode.Parse(File.ReadAllText(Path.Combine(dq, "config.json")))!["dtype"]!.GetValue<string>());
        var p = Provenance(dq)["quantization"]!["probe"]!;
        Assert.Equal(text, p["text"]!.GetValue<string>());
        // The measurement is of the written (bf16) weights, as loading the outputs in fp32 shows.
        AssertMeasured(p["merge_base_difference"], dq, orig, text, stdout);
    }

    [Fact]
    public void PreQuantizedBaseMergesItsDequantizedWeightsAndVerifiesTheOriginal()
    {
        var adapter = WithRecord(AdapterA, Record);
        var deltas = Deltas(adapter);
        var tmp = Fixtures.TempDir();
        string dq = Path.Combine(tmp, "dq"), dqMeasured = Path.Combine(tmp, "dq2"), orig = Path.Combine(tmp, "orig");
        using var nf4 = CheckpointFiles.Open(Nf4);
        using var original = CheckpointFiles.Open(Llama);
        Tensor Dequantized(string key) => Quantizable(key) ? BnbCheckpoint.Dequantize(nf4, key) : nf4.Read(key, ScalarType.Float32, CPU);

        var (code, stdout, stderr) = Merge("--model", Nf4, "--adapter", adapter, "--output", dq, "--dtype", "fp32");
        Assert.True(code == 0, stderr);
        Assert.Contains("not measured", stdout);
        AssertWeights(dq, Dequantized, deltas, "pre-quantized default");
        Assert.Null(Provenance(dq)["quantization"]!["probe"]!["merge_base_difference"]);
        Assert.Equal("nf4", Provenance(dq)["quantization"]!["base_quantization"]!["method"]!.GetValue<string>());

        (code, stdout, stderr) = Merge("--model", Nf4, "--adapter", adapter, "--output", dqMeasured, "--dtype", "fp32", "--merge-base", "dequantized", Llama);
        Assert.True(code == 0, stderr);
        Assert.Contains("verified: re-quantizing it reproduces all", stdout);
        AssertWeights(dqMeasured, Dequantized, deltas, "pre-quantized, measured against the original");

        (code, var stdout2, stderr) = Merge("--model", Nf4, "--adapter", adapter, "--output", orig, "--dtype", "fp32", "--merge-base", "original", Llama);
        Assert.True(code == 0, stderr);
        AssertWeights(orig, k => original.Read(k, ScalarType.Float32, CPU), deltas, "pre-quantized, --merge-base original DIR");
        var probe = LogitDifference.DefaultProbeText;
        AssertMeasured(Provenance(dqMeasured)["quantization"]!["probe"]!["merge_base_difference"], dqMeasured, orig, probe, stdout);
        AssertMeasured(Provenance(orig)["quantization"]!["probe"]!["merge_base_difference"], dqMeasured, orig, probe, stdout2);
        Assert.StartsWith("verified", Provenance(orig)["quantization"]!["original_weights_check"]!.GetValue<string>());
    }

    [Fact]
    public void QuantizeOutputWritesTheMergedWeightsCodesAndMeasuresThem()
    {
        var adapter = WithRecord(AdapterA, Record);
        var tmp = Fixtures.TempDir();
        string merged = Path.Combine(tmp, "merged"), requantized = Path.Combine(tmp, "nf4");
        var (code, _, stderr) = Merge("--model", Llama, "--adapter", adapter, "--output", merged, "--dtype", "fp32");
        Assert.True(code == 0, stderr);
        (code, var stdout, stderr) = Merge("--model", Llama, "--adapter", adapter, "--output", requantized, "--dtype", "fp32", "--quantize-output", "nf4");
        Assert.True(code == 0, stderr);
        using (var m = CheckpointFiles.Open(merged))
        using (var q = CheckpointFiles.Open(requantized))
        {
            var quantized = BnbCheckpoint.QuantizedWeights(q);
            Assert.Equal(m.Names.Where(Quantizable).Order(StringComparer.Ordinal), quantized);
            foreach (var key in quantized)
            {
                using var scope = NewDisposeScope();
                using var mine = Blockwise4Bit.Quantize(m.Read(key, ScalarType.Float32, CPU), "nf4", 64, doubleQuant: true);
                using var stored = BnbCheckpoint.Read4Bit(q, key);
                Assert.True(QuantFormatTests.Same(mine.Data, stored.Data), $"{key}: codes differ");
                Assert.True(QuantFormatTests.Same(mine.AbsmaxFloat(), stored.AbsmaxFloat()), $"{key}: absmax differs");
            }
            foreach (var key in m.Names.Where(k => !Quantizable(k)))
                Assert.True(QuantFormatTests.Same(m.Read(key, ScalarType.Float32, CPU), q.Read(key, ScalarType.Float32, CPU)), $"{key} should be unchanged");
        }
        var p = Provenance(requantized)["quantization"]!;
        Assert.Equal("nf4", p["output_quantization"]!["method"]!.GetValue<string>());
        Assert.Equal("bitsandbytes", JsonNode.Parse(File.ReadAllText(Path.Combine(requantized, "config.json")))!["quantization_config"]!["quant_method"]!.GetValue<string>());
        Assert.Contains("re-quantized vs merged", stdout);
        AssertMeasured(p["probe"]!["requantization_difference"], merged, requantized, LogitDifference.DefaultProbeText, stdout);
    }

    [Fact]
    public void AnAdapterWithoutQuantizationCanStillBeReQuantizedExplicitly()
    {
        var tmp = Fixtures.TempDir();
        string merged = Path.Combine(tmp, "merged"), requantized = Path.Combine(tmp, "int8");
        var (code, _, stderr) = Merge("--model", Llama, "--adapter", AdapterA, "--output", merged, "--dtype", "fp32");
        Assert.True(code == 0, stderr);
        Assert.Null(Provenance(merged)["quantization"]); // the plain merge, unchanged
        (code, var stdout, stderr) = Merge("--model", Llama, "--adapter", AdapterA, "--output", requantized, "--dtype", "fp32", "--quantize-output", "int8");
        Assert.True(code == 0, stderr);
        Assert.Contains("no quantization involved", stdout);
        using (var m = CheckpointFiles.Open(merged))
        using (var q = CheckpointFiles.Open(requantized))
        {
            Assert.Equal(m.Names.Where(Quantizable).Order(StringComparer.Ordinal), BnbCheckpoint.QuantizedWeights(q));
            foreach (var key in BnbCheckpoint.QuantizedWeights(q))
            {
                using var scope = NewDisposeScope();
                using var mine = Int8RowWise.Quantize(m.Read(key, ScalarType.Float32, CPU));
                using var stored = BnbCheckpoint.ReadInt8(q, key);
                Assert.True(QuantFormatTests.Same(mine.Weight, stored.Weight) && QuantFormatTests.Same(mine.Scb, stored.Scb), $"{key}: int8 storage differs");
            }
        }
        var p = Provenance(requantized)["quantization"]!;
        Assert.Equal("base", p["merge_base"]!.GetValue<string>());
        AssertMeasured(p["probe"]!["requantization_difference"], merged, requantized, LogitDifference.DefaultProbeText, stdout);
    }

    [Fact]
    public void TrainingOnThePreQuantizedCheckpointThenMergingUsesItsDequantizedWeights()
    {
        var run = Path.Combine(Fixtures.TempDir(), "run");
        var (code, _, stderr) = CliTests.RunCli("train", "--model", Nf4, "--data", Fixtures.Path_("training", "data.jsonl"), "--output", run,
            "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--seed", "0", "--device", "cpu", "--registry", Path.Combine(Fixtures.TempDir(), "registry"));
        Assert.True(code == 0, stderr);
        var trained = Path.Combine(run, "adapter");
        var deltas = Deltas(trained);
        Assert.True(deltas.Values.Max(d => d.abs().max().item<float>()) > 0, "training moved the adapter");
        using var nf4 = CheckpointFiles.Open(Nf4);
        Tensor Dequantized(string key) => Quantizable(key) ? BnbCheckpoint.Dequantize(nf4, key) : nf4.Read(key, ScalarType.Float32, CPU);
        var tmp = Fixtures.TempDir();
        // Whether or not training wrote the record, its fingerprint says it was trained on this pre-quantized checkpoint.
        foreach (var (adapter, name) in new[] { (trained, "as trained"), (WithRecord(trained, Record), "with the record") })
        {
            var outDir = Path.Combine(tmp, name.Replace(' ', '-'));
            (code, var stdout, stderr) = Merge("--model", Nf4, "--adapter", adapter, "--output", outDir, "--dtype", "fp32");
            Assert.True(code == 0, $"{name}: {stderr}");
            Assert.Contains("trained on:  nf4", stdout);
            AssertWeights(outDir, Dequantized, deltas, name);
        }
        (code, var stdout3, stderr) = Merge("--model", Nf4, "--adapter", trained, "--output", Path.Combine(tmp, "orig"), "--dtype", "fp32", "--merge-base", "original", Llama);
        Assert.True(code == 0, stderr);
        using var original = CheckpointFiles.Open(Llama);
        AssertWeights(Path.Combine(tmp, "orig"), k => original.Read(k, ScalarType.Float32, CPU), deltas, "trained, --merge-base original DIR");
        Assert.Contains("original vs dequantized merge base: max", stdout3);
    }

    /// <summary>A copy of the full-precision llama with one quantized weight changed: not the source of llama-nf4.</summary>
    static string NotTheSource()
    {
        var dir = Fixtures.CopyOf(Llama);
        var path = Path.Combine(dir, "model.safetensors");
        Dictionary<string, Tensor> tensors;
        using (var f = SafetensorsFile.Open(path)) tensors = f.Entries.Keys.ToDictionary(k => k, k => f.Read(k));
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].flip(1).contiguous();
        SafetensorsWriter.Save(path, tensors, new Dictionary<string, string> { ["format"] = "pt" });
        return dir;
    }

    [Fact]
    public void BadCombinationsAreOneLineErrors()
    {
        var withRecord = WithRecord(AdapterA, Record);
        var cases = new (string[] args, string expected)[]
        {
            (["--model", Llama, "--adapter", AdapterA, "--merge-base", "original"], "--merge-base applies to adapters trained on a quantized base"),
            (["--model", Nf4, "--adapter", AdapterA], "records no quantized training base"),
            (["--model", Nf4, "--adapter", withRecord, "--merge-base", "original"], "--merge-base original needs DIR"),
            (["--model", Nf4, "--adapter", withRecord, "--merge-base", "original", Fixtures.Model("mistral")], "is not the same architecture"),
            (["--model", Nf4, "--adapter", withRecord, "--merge-base", "original", NotTheSource()], "is not the full-precision source"),
            (["--model", Nf4, "--adapter", withRecord, "--merge-base", "original", Nf4], "is itself a quantized"),
            (["--model", Llama, "--adapter", withRecord, "--merge-base", "original", Nf4], "leave DIR out"),
            (["--model", Llama, "--adapter", withRecord, "--merge-base", "sideways"], "--merge-base must be dequantized or original"),
            (["--model", Llama, "--adapter", withRecord, "--quantize-output", "q3"], "--quantize-output must be nf4, fp4 or int8"),
            (["--model", Llama, "--adapter", AdapterA, "--probe-text", "hi"], "--probe-text applies when quantization is involved"),
        };
        foreach (var (args, expected) in cases)
        {
            var outDir = Path.Combine(Fixtures.TempDir(), "out");
            var (code, _, stderr) = Merge([.. args, "--output", outDir]);
            var errors = stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => l.StartsWith("error:", StringComparison.Ordinal)).ToList();
            Assert.True(code == 1, $"{string.Join(' ', args)}: exit {code}, {stderr}");
            Assert.True(errors.Count == 1 && errors[0].Contains(expected), $"{string.Join(' ', args)}: {stderr}");
            Assert.False(Directory.Exists(outDir) && Directory.EnumerateFileSystemEntries(outDir).Any(), "nothing written");
        }
    }

    [Fact]
    public void AnAdapterForTheOriginalIsRefusedOnItsQuantizedCheckpointWithAHint()
    {
        // A record adapter trained with quantize-on-load records the original's fingerprint: the bnb checkpoint is another base.
        var dir = WithRecord(AdapterA, Record);
        var path = Path.Combine(dir, AdapterFiles.WeightsFile);
        Dictionary<string, Tensor> tensors;
        Dictionary<string, string> meta;
        using (var f = SafetensorsFile.Open(path)) { tensors = f.Entries.Keys.ToDictionary(k => k, k => f.Read(k)); meta = f.Metadata.ToDictionary(kv => kv.Key, kv => kv.Value); }
        meta[BaseFingerprint.MetadataKey] = BaseFingerprint.Of(Llama);
        SafetensorsWriter.Save(path, tensors, meta);
        var (code, _, stderr) = Merge("--model", Nf4, "--adapter", dir, "--output", Path.Combine(Fixtures.TempDir(), "o"));
        Assert.Equal(1, code);
        Assert.Contains("give --model the checkpoint it was trained on", stderr);
        // On the original it was trained against, the default path applies.
        (code, var stdout, stderr) = Merge("--model", Llama, "--adapter", dir, "--output", Path.Combine(Fixtures.TempDir(), "o"), "--dtype", "fp32");
        Assert.True(code == 0, stderr);
        Assert.Contains("the dequantized base (default", stdout);
    }
}
