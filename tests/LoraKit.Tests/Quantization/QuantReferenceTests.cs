using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Quantization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Quantization;

/// <summary>
/// LoraKit's bitsandbytes formats against fixtures/reference/quant, made by scripts/fixtures/make_quant_fixtures.py — an
/// independent torch implementation of bnb's documented algorithm (bitsandbytes itself is not installed anywhere).
/// Codes, absmax and int8 values must match exactly; the checkpoints made there load here with transformers' fp32 logits
/// of their dequantized weights. A missing fixture file fails these tests (nothing is skipped).
/// </summary>
public class QuantReferenceTests
{
    static string QuantPath(params string[] parts) => Fixtures.Path_(["reference", "quant", .. parts]);

    static SafetensorsFile Blockwise() => SafetensorsFile.Open(QuantPath("blockwise.safetensors"));

    /// <summary>The cases the script wrote: name, shape and block size.</summary>
    static List<(string name, long[] shape, int blocksize)> Cases(SafetensorsFile f)
    {
        Assert.True(f.Metadata.TryGetValue("cases", out var json), "blockwise.safetensors has no 'cases' metadata");
        using var doc = JsonDocument.Parse(json!);
        var cases = doc.RootElement.EnumerateArray().Select(c => (c.GetProperty("name").GetString()!,
            c.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()).ToArray(), c.GetProperty("blocksize").GetInt32())).ToList();
        Assert.True(cases.Count >= 6, "expected at least six cases");
        return cases;
    }

    static bool Same(Tensor a, Tensor b) => QuantFormatTests.Same(a, b);

    [Fact]
    public void TablesMatchBitForBit()
    {
        using var f = Blockwise();
        using var scope = NewDisposeScope();
        Assert.True(Same(Codebooks.Nf4(), f.Read("nf4_table")), "NF4 table");
        Assert.True(Same(Codebooks.Fp4(), f.Read("fp4_table")), "FP4 table");
        Assert.True(Same(Codebooks.DynamicSigned(), f.Read("dynamic_map")), "signed dynamic map");
    }

    [Theory]
    [InlineData("nf4")]
    [InlineData("fp4")]
    public void FourBitCodesAndAbsmaxMatchExactly(string type)
    {
        using var f = Blockwise();
        foreach (var (name, shape, bs) in Cases(f))
        {
            using var scope = NewDisposeScope();
            var x = f.Read($"{name}.input");
            Assert.Equal(shape, x.shape);
            using var q = Blockwise4Bit.Quantize(x, type, bs, doubleQuant: false);
            var p = $"{name}.{type}.plain.";
            Assert.True(Same(q.Data, f.Read(p + "data")), $"{name} {type}: packed codes differ");
            Assert.True(Same(q.Absmax, f.Read(p + "absmax")), $"{name} {type}: absmax differs");
            var y = Blockwise4Bit.Dequantize(q);
            Assert.True(Same(y, f.Read(p + "dequant")), $"{name} {type}: dequantized values differ");
        }
    }

    [Theory]
    [InlineData("nf4")]
    [InlineData("fp4")]
    public void DoubleQuantizationMatches(string type)
    {
        using var f = Blockwise();
        foreach (var (name, shape, bs) in Cases(f))
        {
            using var scope = NewDisposeScope();
            var x = f.Read($"{name}.input");
            var p = $"{name}.{type}.dq.";
            using var q = Blockwise4Bit.Quantize(x, type, bs, doubleQuant: true);
            Assert.True(Same(q.Data, f.Read(p + "data")), $"{name} {type}: packed codes differ");
            float offset = f.Read(p + "offset").item<float>();
            Assert.True(Math.Abs(q.State.nested_offset!.Value - offset) <= 1e-6 * Math.Abs(offset), $"{name} {type}: offset {q.State.nested_offset} vs {offset}");
            // The nested codes from the reference offset (a mean's last bit may depend on the summation order).
            using var plain = Blockwise4Bit.Quantize(x, type, bs, doubleQuant: false);
            var (codes, nestedAbsmax) = DynamicBlockwise.Quantize(plain.Absmax - offset, Codebooks.DynamicSigned(), Blockwise4Bit.NestedBlocksize);
            Assert.True(Same(codes, f.Read(p + "absmax")), $"{name} {type}: double-quantized absmax codes differ");
            Assert.True(Same(nestedAbsmax, f.Read(p + "nested_absmax")), $"{name} {type}: nested absmax differs");
            // Dequantizing the reference's own storage gives the reference's values.
            var state = new QuantState(type, bs, "float32", shape, 256, "float32", offset);
            using var theirs = new Quantized4Bit(f.Read(p + "data"), f.Read(p + "absmax"), Codebooks.For4Bit(type),
                f.Read(p + "nested_absmax"), Codebooks.DynamicSigned(), state);
            var expected = f.Read(p + "dequant");
            Assert.True(Close.RelError(Blockwise4Bit.Dequantize(theirs), expected) == 0, $"{name} {type}: dequantized values differ");
            Assert.True(Close.RelError(Blockwise4Bit.Dequantize(q), expected) <= 1e-5, $"{name} {type}: round trip differs");
        }
    }

    [Fact]
    public void Int8MatchesExactly()
    {
        using var f = Blockwise();
        foreach (var (name, shape, _) in Cases(f))
        {
            using var scope = NewDisposeScope();
            var x = f.Read($"{name}.input");
            using var q = Int8RowWise.Quantize(x);
            Assert.True(Same(q.Weight, f.Read($"{name}.int8.weight")), $"{name}: int8 codes differ");
            Assert.True(Same(q.Scb, f.Read($"{name}.int8.scb")), $"{name}: SCB differs");
            Assert.True(Same(Int8RowWise.Dequantize(q), f.Read($"{name}.int8.dequant")), $"{name}: dequantized values differ");
        }
    }

    /// <summary>The held-out check of issue 20: a bnb-format checkpoint made outside LoraKit gives transformers' fp32 logits of its dequantized weights.</summary>
    [Theory]
    [InlineData("nf4")]
    [InlineData("fp4")]
    [InlineData("int8")]
    public void ForeignCheckpointGivesTheLogitsOfItsDequantizedWeights(string method)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        using var refs = SafetensorsFile.Open(QuantPath("llama-logits.safetensors"));
        var ids = refs.Read("input_ids").unsqueeze(0);
        using var model = CausalLM.Load(QuantPath("llama-" + method), ScalarType.Float32, CPU);
        var logits = model.Logits(ids, null, null)[0];
        double rel = Close.RelError(logits, refs.Read("logits_" + method));
        Assert.True(rel <= 1e-4, $"{method}: logits relative error {rel:E2} > 1e-4");
        // The quantization is visible: these are not the original model's logits.
        Assert.True(Close.RelError(logits, refs.Read("logits_fp32")) > 1e-4, $"{method}: logits equal the unquantized model's");
    }

    /// <summary>LoraKit's writer reproduces the reference checkpoint: the same keys, codes, absmax, quant state and config block.</summary>
    [Theory]
    [InlineData("nf4", true, 64)]
    [InlineData("fp4", false, 128)]
    [InlineData("int8", false, 64)]
    public void WriterReproducesTheReferenceCheckpoint(string method, bool dq, int blocksize)
    {
        var dir = Path.Combine(Fixtures.TempDir(), "q");
        using var scope = NewDisposeScope();
        using (var sf = SafetensorsFile.Open(Path.Combine(Fixtures.Model("llama"), "model.safetensors")))
        {
            var tensors = sf.Entries.Keys.Order(StringComparer.Ordinal).Select(k => (k, sf.Read(k))).ToList();
            var config = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Model("llama"), "config.json")))!;
            BnbCheckpointWriter.Write(dir, config, tensors, Fixtures.Model("llama"), new BnbQuantizeOptions(method, dq, blocksize, "float32"));
        }
        using var ours = CheckpointFiles.Open(dir);
        using var theirs = CheckpointFiles.Open(QuantPath("llama-" + method));
        Assert.Equal(theirs.Names.Order(StringComparer.Ordinal), ours.Names.Order(StringComparer.Ordinal));
        foreach (var name in theirs.Names)
        {
            var (a, b) = (ours.Entry(name), theirs.Entry(name));
            Assert.True(a.DType == b.DType && a.Shape.SequenceEqual(b.Shape), $"{name}: {a.DType} [{string.Join(",", a.Shape)}] vs {b.DType} [{string.Join(",", b.Shape)}]");
            if (name.Contains(".quant_state."))
            {
                var sa = QuantState.Parse(ours.ReadStored(name).bytes, name);
                var sb = QuantState.Parse(theirs.ReadStored(name).bytes, name);
                Assert.True((sa with { nested_offset = sb.nested_offset }).SameAs(sb), $"{name}: quant state differs");
                if (sb.Nested) Assert.True(Math.Abs(sa.nested_offset!.Value - sb.nested_offset!.Value) <= 1e-6 * Math.Abs(sb.nested_offset.Value), $"{name}: offset");
            }
            else if (!(dq && (name.EndsWith(".absmax", StringComparison.Ordinal) || name.EndsWith(".nested_absmax", StringComparison.Ordinal))))
                Assert.True(Same(ours.ReadStored(name), theirs.ReadStored(name)), $"{name} differs");
        }
        var cfgOurs = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!["quantization_config"];
        var cfgTheirs = JsonNode.Parse(File.ReadAllText(Path.Combine(QuantPath("llama-" + method), "config.json")))!["quantization_config"];
        Assert.True(JsonNode.DeepEquals(cfgOurs, cfgTheirs), $"quantization_config: {cfgOurs?.ToJsonString()} vs {cfgTheirs?.ToJsonString()}");
    }
}
