using System.Text;
using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Models;
using LoraKit.Quantization;
using static TorchSharp.torch;

namespace LoraKit.Tests.Quantization;

/// <summary>
/// Properties of the bitsandbytes storage formats that need no reference: table shapes and order, the error bound of a
/// round trip, the packing order, QuantState JSON, malformed checkpoints (one-line errors naming file and tensor), and a
/// written checkpoint loading into the model with exactly its dequantized weights.
/// </summary>
public class QuantFormatTests
{
    /// <summary>Same shape and every element equal.</summary>
    internal static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    [Fact]
    public void TablesHaveBnbShapeAndOrder()
    {
        using var nf4 = Codebooks.Nf4();
        using var fp4 = Codebooks.Fp4();
        using var dyn = Codebooks.DynamicSigned();
        Assert.Equal(16, nf4.numel());
        Assert.Equal(-1f, nf4[0].item<float>());
        Assert.Equal(1f, nf4[15].item<float>());
        Assert.Equal(0f, nf4[7].item<float>());
        Assert.True(nf4[1..].gt(nf4[..^1]).all().item<bool>(), "NF4 is sorted by code");
        Assert.Equal(1f, fp4.abs().max().item<float>());
        // FP4: sign bit 8 mirrors the positive half.
        Assert.True(Same(fp4[8..], -fp4[..8]), "FP4 codes 8..15 are the negatives of 0..7");
        Assert.Equal(256, dyn.numel());
        Assert.True(dyn[1..].gt(dyn[..^1]).all().item<bool>(), "the dynamic map is strictly increasing");
        Assert.Equal(1f, dyn[255].item<float>());
        Assert.Equal(1, dyn.eq(0).sum().item<long>());
        Assert.True(dyn[0].item<float>() > -1f && dyn[0].item<float>() < -0.99f);
    }

    [Fact]
    public void FourBitPivotsAreMidpointsOfTheTable()
    {
        using var nf4 = Codebooks.Nf4();
        var v = nf4.data<float>().ToArray();
        var p = Codebooks.Nf4Pivots();
        for (int i = 0; i < 15; i++) Assert.True(Math.Abs(p[i] - (v[i] + v[i + 1]) / 2) < 1e-7, $"NF4 pivot {i}");
        var mags = new[] { 0f, 0.0625f / 12, 2f / 12, 3f / 12, 4f / 12, 6f / 12, 8f / 12, 1f };
        var f = Codebooks.Fp4MagnitudePivots();
        for (int i = 0; i < 7; i++) Assert.True(Math.Abs(f[i] - (mags[i] + mags[i + 1]) / 2) < 1e-6, $"FP4 pivot {i}");
    }

    [Theory]
    [InlineData("nf4", 64, true, 64, 64)]
    [InlineData("nf4", 64, false, 33, 70)]
    [InlineData("fp4", 128, true, 7, 13)]
    [InlineData("fp4", 32, false, 300, 40)]
    public void RoundTripErrorIsBoundedByHalfTheLargestGap(string type, int blocksize, bool dq, int rows, int cols)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(7);
        var x = randn([rows, cols], generator: gen) * 0.1;
        using var q = Blockwise4Bit.Quantize(x, type, blocksize, dq);
        var y = Blockwise4Bit.Dequantize(q);
        Assert.Equal(x.shape, y.shape);
        var table = Codebooks.For4Bit(type).sort().Values;
        double halfGap = (table[1..] - table[..^1]).max().item<float>() / 2;
        var (blocks, n) = Blocks.Split(x, blocksize);
        var absmax = blocks.abs().amax([1]);
        var err = Blocks.Split(y - x, blocksize).blocks.abs().amax([1]);
        // Double quantization perturbs absmax by up to half a dynamic-map step (≤ 1% of the largest |absmax − mean|).
        var slack = dq ? (absmax - absmax.mean()).abs().max() * 0.01 : zeros(1);
        var bound = absmax * (halfGap * (1 + 1e-5)) + slack + 1e-7;
        Assert.True(err.le(bound).all().item<bool>(), $"{type}: max error {err.max().item<float>()} over the bound");
        Assert.True(err.gt(0).any().item<bool>(), "quantization is lossy");
    }

    [Fact]
    public void PackingPutsTheFirstElementInTheHighNibble()
    {
        using var packed = Blockwise4Bit.Pack(tensor(new long[] { 1, 2, 3, 15, 7 }));
        Assert.Equal(new byte[] { 0x12, 0x3F, 0x70 }, packed.data<byte>().ToArray());
        using var codes = Blockwise4Bit.Unpack(packed, 5);
        Assert.Equal(new long[] { 1, 2, 3, 15, 7 }, codes.data<long>().ToArray());
    }

    [Fact]
    public void QuantizedValuesAreTableValuesTimesAbsmax()
    {
        using var scope = NewDisposeScope();
        // One block: absmax 2 and a value exactly at 2 × an NF4 entry.
        var table = Codebooks.Nf4();
        var x = zeros(64);
        x[0] = tensor(2f);
        x[1] = table[3] * 2;
        x[2] = tensor(-2f);
        using var q = Blockwise4Bit.Quantize(x, "nf4", 64, doubleQuant: false);
        var codes = Blockwise4Bit.Unpack(q.Data, 64);
        Assert.Equal(new long[] { 15, 3, 0, 7 }, codes[..4].data<long>().ToArray());
        Assert.Equal(2f, q.Absmax.item<float>());
    }

    [Fact]
    public void QuantStateJsonRoundTripsInBnbFormat()
    {
        var s = new QuantState("nf4", 64, "bfloat16", [4096, 11008], 256, "float32", 0.012345678918063641);
        string json = s.ToJson();
        Assert.Equal("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [4096, 11008], " +
            "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.012345678918063641}", json);
        using var t = s.ToTensor();
        Assert.Equal(ScalarType.Byte, t.dtype);
        var back = QuantState.Parse(t.bytes, "x");
        Assert.True(back.SameAs(s));
        var plain = new QuantState("fp4", 128, "float32", [7, 13]);
        Assert.True(QuantState.Parse(Encoding.UTF8.GetBytes(plain.ToJson()), "x").SameAs(plain));
        Assert.DoesNotContain("nested", plain.ToJson());
    }

    [Theory]
    [InlineData("{\"quant_type\": \"int4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2]}", "unknown quant_type 'int4'")]
    [InlineData("{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"float32\", \"shape\": [2]}", "blocksize 48")]
    [InlineData("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\"}", "no shape")]
    [InlineData("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [2]}", "dtype 'int8'")]
    [InlineData("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2], \"nested_offset\": 1.0}", "nested_offset but no nested_blocksize")]
    [InlineData("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\"}", "no finite nested_offset")]
    [InlineData("{\"quant_type\": ", "not valid JSON")]
    [InlineData("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4294967296, 4294967296]}", "overflows")]
    public void MalformedQuantStateIsAOneLineError(string json, string expected)
    {
        var e = Assert.ThrowsAny<LoraKitException>(() => QuantState.Parse(Encoding.UTF8.GetBytes(json), "f.safetensors: tensor 'w'"));
        Assert.Contains(expected, e.Message);
        Assert.StartsWith("f.safetensors: tensor 'w'", e.Message);
        Assert.DoesNotContain("\n", e.Message);
    }

    [Fact]
    public void Int8RoundTripIsWithinHalfAStep()
    {
        using var scope = NewDisposeScope();
        var w = randn([24, 40], generator: new Generator(3)) * 0.2;
        w[5] = zeros(40); // an all-zero row stays zero
        using var q = Int8RowWise.Quantize(w);
        Assert.Equal(ScalarType.Int8, q.Weight.dtype);
        var y = Int8RowWise.Dequantize(q);
        var w16 = w.to(ScalarType.Float16).to(ScalarType.Float32);
        Assert.True(Same(q.Scb, w16.abs().amax([1])), "SCB is the fp16 row absmax");
        var bound = q.Scb.unsqueeze(1) / 127 * 0.5 * (1 + 1e-5) + 1e-7;
        Assert.True((y - w16).abs().le(bound).all().item<bool>());
        Assert.Equal(0f, y[5].abs().max().item<float>());
        Assert.Equal(127, q.Weight.abs().to(ScalarType.Int32).amax([1])[0].item<int>());
    }

    // ---- checkpoints ------------------------------------------------------------------------------------------

    /// <summary>A bnb-format checkpoint of the tiny llama written by LoraKit's writer, and the model with its dequantized weights.</summary>
    static string WriteQuantized(BnbQuantizeOptions options)
    {
        var dir = Path.Combine(Fixtures.TempDir(), "q");
        using var scope = NewDisposeScope();
        using var sf = SafetensorsFile.Open(Path.Combine(Fixtures.Model("llama"), "model.safetensors"));
        var tensors = sf.Entries.Keys.OrderBy(k => k, StringComparer.Ordinal).Select(k => (k, sf.Read(k))).ToList();
        var config = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Model("llama"), "config.json")))!;
        BnbCheckpointWriter.Write(dir, config, tensors, Fixtures.Model("llama"), options);
        return dir;
    }

    [Theory]
    [InlineData("nf4", true, 64)]
    [InlineData("fp4", false, 128)]
    [InlineData("int8", false, 64)]
    public void WrittenCheckpointLoadsWithItsDequantizedWeights(string method, bool dq, int blocksize)
    {
        var dir = WriteQuantized(new BnbQuantizeOptions(method, dq, blocksize, "float32"));
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        using (var files = CheckpointFiles.Open(dir))
        {
            var quantized = BnbCheckpoint.QuantizedWeights(files);
            Assert.Equal(14, quantized.Count); // 7 linear layers × 2 decoder layers; lm_head and embeddings stay
            Assert.DoesNotContain("lm_head.weight", quantized);
            Assert.All(quantized, n => Assert.Equal(method == "int8" ? BnbKind.Int8 : BnbKind.FourBit, BnbCheckpoint.KindOf(files, n)));
            const string q = "model.layers.0.self_attn.q_proj.";
            if (method == "int8")
            {
                Assert.Equal("I8 64,64", Describe(files.Entry(q + "weight")));
                Assert.Equal("F32 64", Describe(files.Entry(q + "SCB")));
                Assert.Equal("U8 ", Describe(files.Entry(q + "weight_format"))); // a 0-dim tensor, as torch.tensor(0, dtype=uint8)
            }
            else
                Assert.Equal($"U8 {64 * 64 / 2},1", Describe(files.Entry(q + "weight")));
        }
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!["quantization_config"]!;
        Assert.Equal("bitsandbytes", (string)cfg["quant_method"]!);
        Assert.Equal(method != "int8", (bool)cfg["load_in_4bit"]!);
        // Python reads 6 as an int and BitsAndBytesConfig.post_init then refuses the config: it must be written 6.0.
        Assert.Contains("\"llm_int8_threshold\": 6.0", File.ReadAllText(Path.Combine(dir, "config.json")));

        var ids = tensor(new long[] { 0, 5, 17, 42, 99, 150, 233 }).unsqueeze(0);
        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        var logits = model.Logits(ids, null, null);
        // The same model built from an fp32 checkpoint of the dequantized weights.
        var plainDir = Path.Combine(Fixtures.TempDir(), "deq");
        Directory.CreateDirectory(plainDir);
        using (var files = CheckpointFiles.Open(dir))
        {
            var deq = files.Names.Where(n => BnbCheckpoint.KindOf(files, n) != BnbKind.None || !IsCompanion(files, n))
                .ToDictionary(n => n, n => BnbCheckpoint.KindOf(files, n) != BnbKind.None ? BnbCheckpoint.Dequantize(files, n) : files.ReadStored(n));
            SafetensorsWriter.Save(Path.Combine(plainDir, "model.safetensors"), deq);
        }
        File.Copy(Path.Combine(Fixtures.Model("llama"), "config.json"), Path.Combine(plainDir, "config.json"));
        using var plain = CausalLM.Load(plainDir, ScalarType.Float32, CPU);
        Assert.True(Same(logits, plain.Logits(ids, null, null)), "logits equal those of the dequantized weights");
        using var original = CausalLM.Load(Fixtures.Model("llama"), ScalarType.Float32, CPU);
        Assert.False(Same(logits, original.Logits(ids, null, null)), "quantization changed the weights");
    }

    static string Describe(SafetensorsEntry e) => e.DType + " " + string.Join(",", e.Shape);

    static bool IsCompanion(CheckpointFiles files, string name) =>
        BnbCheckpoint.QuantizedWeights(files).Any(w => BnbCheckpoint.CompanionNames(files, w).Contains(name));

    /// <summary>Copies a written NF4 checkpoint with one tensor replaced or removed, and returns the loader's error.</summary>
    static LoraKitException Corrupt(Action<Dictionary<string, Tensor>> edit)
    {
        var dir = WriteQuantized(new BnbQuantizeOptions("nf4", true, 64, "float32"));
        var path = Path.Combine(dir, "model.safetensors");
        Dictionary<string, Tensor> all;
        using (var sf = SafetensorsFile.Open(path)) all = sf.Entries.Keys.ToDictionary(k => k, k => sf.Read(k));
        edit(all);
        SafetensorsWriter.Save(path, all);
        return Assert.ThrowsAny<LoraKitException>(() =>
        {
            using var files = CheckpointFiles.Open(dir);
            using var _ = BnbCheckpoint.Dequantize(files, "model.layers.0.self_attn.q_proj.weight");
        });
    }

    const string Q = "model.layers.0.self_attn.q_proj.weight";

    [Fact]
    public void MissingAbsmaxNamesFileAndTensor()
    {
        var e = Corrupt(t => t.Remove(Q + ".absmax"));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains($"'{Q}'", e.Message);
        Assert.Contains(".absmax", e.Message);
    }

    [Fact]
    public void TruncatedDataIsRefused()
    {
        var e = Corrupt(t => t[Q] = t[Q][..^3]);
        Assert.Contains("truncated", e.Message);
        Assert.Contains($"'{Q}'", e.Message);
    }

    [Fact]
    public void ShapeThatDoesNotMatchTheAbsmaxIsRefused()
    {
        var e = Corrupt(t => t[Q + ".absmax"] = t[Q + ".absmax"][..^1]);
        Assert.Contains("blocks", e.Message);
        Assert.Contains(".absmax", e.Message);
    }

    [Fact]
    public void UnknownQuantTypeIsRefused()
    {
        var e = Corrupt(t =>
        {
            var json = Encoding.UTF8.GetString(t[Q + ".quant_state.bitsandbytes__nf4"].bytes).Replace("\"nf4\"", "\"nf3\"");
            t[Q + ".quant_state.bitsandbytes__nf4"] = tensor(Encoding.UTF8.GetBytes(json), ScalarType.Byte);
        });
        Assert.Contains("unknown quant_type 'nf3'", e.Message);
        Assert.Contains("model.safetensors", e.Message);
    }

    [Fact]
    public void PackedBytesStoredAsBf16AreReadByTheirBytes()
    {
        // FSDP-style checkpoints (bnb_4bit_quant_storage=bfloat16) keep the packed codes as bf16 elements.
        var dir = WriteQuantized(new BnbQuantizeOptions("nf4", true, 64, "float32"));
        var path = Path.Combine(dir, "model.safetensors");
        Tensor expected;
        using (var files = CheckpointFiles.Open(dir)) expected = BnbCheckpoint.Dequantize(files, Q);
        Dictionary<string, Tensor> all;
        using (var sf = SafetensorsFile.Open(path)) all = sf.Entries.Keys.ToDictionary(k => k, k => sf.Read(k));
        var bytes = all[Q].bytes.ToArray();
        var asBf16 = empty([bytes.Length / 2, 1], ScalarType.BFloat16);
        asBf16.bytes = bytes;
        all[Q] = asBf16;
        SafetensorsWriter.Save(path, all);
        using var files2 = CheckpointFiles.Open(dir);
        Assert.Equal(BnbKind.FourBit, BnbCheckpoint.KindOf(files2, Q));
        using var got = BnbCheckpoint.Dequantize(files2, Q);
        Assert.True(Same(got, expected));
    }
}

/// <summary>The packed 4-bit weight computes exactly with its dequantized weight, holds no parameter, and gradients reach the input.</summary>
public class PackedWeightTests
{
    [Fact]
    public void ForwardEqualsLinearOfTheDequantizedWeight()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(11);
        var w = randn([24, 40], generator: gen) * 0.1;
        var bias = randn([24], generator: gen);
        using var packed = new Packed4BitWeight(Blockwise4Bit.Quantize(w, "nf4", 64, true));
        var x = randn([3, 5, 40], generator: gen).requires_grad_(true);
        var y = packed.Linear(x, bias);
        var expected = nn.functional.linear(x, Blockwise4Bit.Dequantize(packed.Storage), bias);
        Assert.True(QuantFormatTests.Same(y, expected));
        Assert.Equal(new long[] { 3, 5, 24 }, y.shape);
        y.sum().backward();
        Assert.NotNull(x.grad);
        Assert.Equal(new long[] { 24, 40 }, packed.Shape);
        Assert.Empty(packed.parameters());
    }
}
