using LoraKit.Export;
using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Tests.Export;

/// <summary>
/// What <c>lorakit export gguf</c> writes, read back with the tests' own GGUF reader: the metadata convert_hf_to_gguf.py
/// writes, the tensor names and types (F32 for norms and 1-D tensors), exact values where the type is exact and Q8_0
/// within its block error, the LoRA layout llama.cpp checks, llama.cpp's own tokenization of the exported vocabulary,
/// and the refusals (existing output, unsupported architecture, DoRA as a LoRA GGUF).
/// </summary>
public sealed class GgufFormatTests : IDisposable
{
    readonly string _dir = Directory.CreateTempSubdirectory("lorakit-gguf-format-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    string Out(string name) => Path.Combine(_dir, name);

    [Theory]
    [InlineData("llama", "llama", "gpt2", "llama-bpe")]
    [InlineData("qwen2", "qwen2", "gpt2", "qwen2")]
    [InlineData("qwen3", "qwen3", "gpt2", "qwen2")]
    [InlineData("mistral", "llama", "llama", null)]
    [InlineData("phi3", "phi3", "llama", null)]
    public void MetadataAndTensorsFollowConvertHfToGguf(string fixture, string arch, string tokenizerModel, string? pre)
    {
        var path = Out(fixture + ".gguf");
        GgufExport.Model(Fixtures.Model(fixture), null, path, GgufFileType.F16);
        var f = GgufFile.Read(path);
        var config = Models.ModelConfig.Load(Fixtures.Model(fixture));

        Assert.Equal(3u, f.Version);
        Assert.Equal(arch, f.Metadata["general.architecture"]);
        Assert.Equal(1u, f.Metadata["general.file_type"]);
        Assert.Equal((uint)config.NumHiddenLayers, f.Metadata[$"{arch}.block_count"]);
        Assert.Equal((uint)config.HiddenSize, f.Metadata[$"{arch}.embedding_length"]);
        Assert.Equal((uint)config.NumKeyValueHeads, f.Metadata[$"{arch}.attention.head_count_kv"]);
        Assert.Equal((float)config.RmsNormEps, f.Metadata[$"{arch}.attention.layer_norm_rms_epsilon"]);
        Assert.Equal(tokenizerModel, f.Metadata["tokenizer.ggml.model"]);
        Assert.Equal(pre, f.Metadata.GetValueOrDefault("tokenizer.ggml.pre"));
        var tokens = (object[])f.Metadata["tokenizer.ggml.tokens"];
        Assert.Equal(config.VocabSize, tokens.Length);
        Assert.Equal(tokens.Length, ((object[])f.Metadata["tokenizer.ggml.token_type"]).Length);
        Assert.Equal(tokenizerModel == "gpt2", f.Metadata.ContainsKey("tokenizer.ggml.merges"));
        Assert.Equal(tokenizerModel == "llama", f.Metadata.ContainsKey("tokenizer.ggml.scores"));

        Assert.Equal(GgmlType.F16, f.Tensors["token_embd.weight"].Type);
        Assert.Equal(config.TieWordEmbeddings, !f.Tensors.ContainsKey("output.weight"));
        foreach (var t in f.Tensors.Values.Where(t => t.Ne.Length == 1 || t.Name.EndsWith("_norm.weight", StringComparison.Ordinal)))
            Assert.Equal(GgmlType.F32, t.Type);
        Assert.Equal([config.HiddenSize, config.VocabSize], f.Tensors["token_embd.weight"].Ne);
        Assert.Contains(config.FusedQkv ? "blk.1.attn_qkv.weight" : "blk.1.attn_k.weight", f.Tensors.Keys);
        Assert.Equal(config.RopeScaling is not null, f.Tensors.ContainsKey("rope_freqs.weight"));
    }

    [Fact]
    public void F32ExportHoldsTheCheckpointValuesAndQ8_0StaysWithinItsBlockError()
    {
        string f32 = Out("q-f32.gguf"), q8 = Out("q-q8.gguf");
        GgufExport.Model(Fixtures.Model("qwen3"), null, f32, GgufFileType.F32);
        GgufExport.Model(Fixtures.Model("qwen3"), null, q8, GgufFileType.Q8_0);
        using var files = CheckpointFiles.Open(Fixtures.Model("qwen3"));
        using var reference = files.Read("model.layers.0.mlp.down_proj.weight", ScalarType.Float32, CPU);
        var want = reference.data<float>().ToArray();
        var exact = GgufFile.Read(f32);
        Assert.Equal(want, exact.Floats("blk.0.ffn_down.weight")); // Qwen's rows are not permuted: the same row-major values

        var quant = GgufFile.Read(q8);
        Assert.Equal(GgmlType.Q8_0, quant.Tensors["blk.0.ffn_down.weight"].Type);
        var got = quant.Floats("blk.0.ffn_down.weight");
        for (int b = 0; b < want.Length / 32; b++)
        {
            var block = want.AsSpan(b * 32, 32).ToArray();
            float step = block.Max(MathF.Abs) / 127;
            // half a step of rounding, plus the scale's own fp16 rounding (≤ 2^-11 relative) times up to 127 steps
            float bound = 0.5f * step + 127 * MathF.Abs(step - (float)(Half)step) + 1e-7f;
            for (int j = 0; j < 32; j++)
                Assert.True(MathF.Abs(got[b * 32 + j] - block[j]) <= bound * 1.001f, $"block {b}, value {j}: {got[b * 32 + j]} vs {block[j]}");
        }
    }

    [Fact]
    public void LoraGgufHasTheLayoutLlamaCppChecks()
    {
        var path = Out("lora.gguf");
        GgufExport.Adapter(Fixtures.Model("llama"), Fixtures.Path_("adapters", "llama", "a"), path, GgufFileType.F32);
        var f = GgufFile.Read(path);
        var lora = Lora.LoraConfig.Load(Fixtures.Path_("adapters", "llama", "a"));
        Assert.Equal("adapter", f.Metadata["general.type"]);
        Assert.Equal("lora", f.Metadata["adapter.type"]);
        Assert.Equal((float)lora.LoraAlpha, f.Metadata["adapter.lora.alpha"]);
        Assert.NotEmpty(f.Tensors);
        foreach (var a in f.Tensors.Values.Where(t => t.Name.EndsWith(".lora_a", StringComparison.Ordinal)))
        {
            var b = f.Tensors[a.Name[..^1] + "b"];
            Assert.Equal(lora.R, a.Ne[1]); // a: [in, r], b: [r, out] in ggml order (llama.cpp: a.ne[1] == b.ne[0])
            Assert.Equal(a.Ne[1], b.Ne[0]);
        }
    }

    /// <summary>llama.cpp tokenizes text with the exported vocabulary as LoraKit (transformers' tokenizer) does.</summary>
    [Theory, InlineData("llama"), InlineData("qwen2"), InlineData("qwen3"), InlineData("mistral"), InlineData("phi3"), InlineData("phi4mini")]
    public void LlamaCppTokenizesAsLoraKit(string fixture)
    {
        var path = Out(fixture + "-tok.gguf");
        GgufExport.Model(Fixtures.Model(fixture), null, path, GgufFileType.F16);
        var tokenizer = Tokenization.Tokenizer.Load(Fixtures.Model(fixture));
        foreach (var text in new[] { "The quick brown fox jumps over the lazy dog.", "Hello, world! 12345 it's" })
            Assert.Equal(tokenizer.Encode(text), LlamaCpp.Tokenize(path, text));
    }

    [Fact]
    public void AnExistingOutputIsNeverOverwritten()
    {
        var path = Out("taken.gguf");
        File.WriteAllText(path, "not ours");
        var e = Assert.Throws<GgufExportException>(() => GgufExport.Model(Fixtures.Model("llama"), null, path));
        Assert.Contains("already exists", e.Message);
        Assert.Equal("not ours", File.ReadAllText(path));
        Assert.Throws<GgufExportException>(() => GgufExport.Adapter(Fixtures.Model("llama"), Fixtures.Path_("adapters", "llama", "a"), path));
        Assert.Equal("not ours", File.ReadAllText(path));
    }

    [Theory, InlineData("gemma2"), InlineData("gemma3")]
    public void GemmaIsRefusedInOneLine(string fixture)
    {
        var path = Out(fixture + ".gguf");
        var e = Assert.Throws<GgufExportException>(() => GgufExport.Model(Fixtures.Model(fixture), null, path));
        Assert.DoesNotContain('\n', e.Message);
        Assert.Contains("not exported to GGUF", e.Message);
        Assert.False(File.Exists(path));
    }

    [Fact]
    public void DoraHasNoLoraGguf()
    {
        var path = Out("dora.gguf");
        var e = Assert.Throws<GgufExportException>(() => GgufExport.Adapter(Fixtures.Model("llama"), Fixtures.Path_("adapters", "llama", "dora"), path));
        Assert.Contains("DoRA", e.Message);
        Assert.False(File.Exists(path));
    }

    [Fact]
    public void CliWritesTheFileAndRefusesAnUnknownType()
    {
        var path = Out("cli.gguf");
        var (code, stdout, stderr) = CliTests.RunCli("export", "gguf", "--model", Fixtures.Model("qwen2"), "--adapter", Fixtures.Path_("adapters", "qwen2", "a"), "--output", path);
        Assert.True(code == 0, stderr);
        Assert.Contains("wrote", stdout);
        Assert.Equal("qwen2", GgufFile.Read(path).Metadata["general.architecture"]);
        (code, _, stderr) = CliTests.RunCli("export", "gguf", "--model", Fixtures.Model("qwen2"), "--output", Out("x.gguf"), "--type", "q4_k");
        Assert.Equal(1, code);
        Assert.Contains("unknown GGUF type 'q4_k'", stderr);
    }
}
