using System.Text;
using LoraKit.IO;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>Malformed safetensors files each get an error naming the file and the problem; good ones round-trip.</summary>
public class SafetensorsTests
{
    static string Write(byte[] bytes)
    {
        var path = Path.Combine(Fixtures.TempDir(), "model.safetensors");
        File.WriteAllBytes(path, bytes);
        return path;
    }

    static byte[] Build(string header, int dataBytes, ulong? lengthOverride = null)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var ms = new MemoryStream();
        ms.Write(BitConverter.GetBytes(lengthOverride ?? (ulong)h.Length));
        ms.Write(h);
        ms.Write(new byte[dataBytes]);
        return ms.ToArray();
    }

    static void AssertFails(byte[] bytes, string fragment)
    {
        var path = Write(bytes);
        var ex = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(path).Dispose());
        Assert.Contains(path, ex.Message);
        Assert.Contains(fragment, ex.Message);
    }

    const string Good = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[16,22]}}";

    [Fact] public void GoodHeaderOpens() { using var f = SafetensorsFile.Open(Write(Build(Good, 22))); Assert.Equal(2, f.Entries.Count); }
    [Fact] public void Truncated() => AssertFails(Build(Good, 22)[..^5], "truncated");
    [Fact] public void HeaderLongerThanFile() => AssertFails(Build(Good, 22, lengthOverride: 10_000), "larger than the file");
    [Fact] public void HeaderOverCap() => AssertFails(Build(Good, 22, lengthOverride: 200_000_000), "exceeds");
    [Fact] public void TooShort() => AssertFails([1, 2, 3], "too short");
    [Fact] public void NotJson() => AssertFails(Build("{not json at all", 0), "not valid JSON");
    [Fact] public void NotUtf8() => AssertFails(Build("{\"a\xff\":1}", 0).Select((b, i) => i == 10 ? (byte)0xff : b).ToArray(), "UTF-8");
    [Fact] public void TrailingBytes() => AssertFails(Build(Good, 30), "trailing bytes");

    [Fact]
    public void Overlapping() => AssertFails(Build(
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16), "overlaps");

    [Fact]
    public void WrongByteCount() => AssertFails(Build(
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", 16), "needs 24");

    [Fact]
    public void ShapeOverflow() => AssertFails(Build(
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,16]}}", 16), "overflow");

    [Fact]
    public void UnknownDType() => AssertFails(Build(
        "{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2), "unsupported dtype");

    [Fact]
    public void Gap() => AssertFails(Build(
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8), "gap");

    [Fact]
    public void WriterRoundTripsEveryDTypeBitExactly()
    {
        var path = Path.Combine(Fixtures.TempDir(), "t.safetensors");
        var tensors = new Dictionary<string, Tensor>
        {
            ["f32"] = randn(3, 5), ["bf16"] = randn(7).to(ScalarType.BFloat16), ["f16"] = randn(2, 2).to(ScalarType.Float16),
            ["i64"] = arange(10), ["empty"] = zeros(0, 4),
        };
        SafetensorsWriter.Save(path, tensors, new Dictionary<string, string> { ["format"] = "pt" });
        using var f = SafetensorsFile.Open(path);
        Assert.Equal("pt", f.Metadata["format"]);
        foreach (var (name, t) in tensors)
        {
            using var back = f.Read(name);
            Assert.Equal(t.dtype, back.dtype);
            Assert.Equal(t.shape, back.shape);
            Assert.True(t.eq(back).all().item<bool>(), name);
        }
    }

    [Fact]
    public void MissingUnexpectedAndMisshapenWeightsNameTheTensor()
    {
        var src = Fixtures.Model("llama");
        // Copy the checkpoint and rewrite its weights with one tensor dropped, renamed or reshaped.
        void Check(Action<Dictionary<string, Tensor>> edit, string fragment)
        {
            var dir = Fixtures.CopyOf(src);
            var weights = new Dictionary<string, Tensor>();
            using (var file = SafetensorsFile.Open(Path.Combine(src, "model.safetensors")))
                foreach (var n in file.Entries.Keys) weights[n] = file.Read(n);
            edit(weights);
            SafetensorsWriter.Save(Path.Combine(dir, "model.safetensors"), weights);
            var ex = Assert.Throws<InvalidDataException>(() => CausalLM.Load(dir, ScalarType.Float32, CPU).Dispose());
            Assert.Contains(fragment, ex.Message);
        }
        Check(w => w.Remove("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'");
        Check(w => w["model.layers.9.extra.weight"] = zeros(2), "unexpected tensor 'model.layers.9.extra.weight'");
        Check(w => w["model.norm.weight"] = zeros(63), "'model.norm.weight' has shape [63]");
    }

    [Fact]
    public void ShardedCheckpointWithMissingShardIsAClearError()
    {
        var dir = Fixtures.CopyOf(Fixtures.Model("mistral"));
        File.Delete(Path.Combine(dir, "model-00003-of-00006.safetensors"));
        var ex = Assert.Throws<SafetensorsException>(() => CausalLM.Load(dir, ScalarType.Float32, CPU).Dispose());
        Assert.Contains("model-00003-of-00006.safetensors", ex.Message);
        Assert.Contains("not found", ex.Message);
    }
}
