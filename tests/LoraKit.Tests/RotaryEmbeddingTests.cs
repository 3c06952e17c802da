using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.IO;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>
/// RoPE variants: partial rotary, LongRoPE's short/long factor choice and attention factor, Gemma 3's per-layer-type
/// tables and linear scaling. Checked against tables built another way (a plain-RoPE config with the same base) and,
/// once the family fixtures are committed, against the tables transformers' own rotary modules give
/// (scripts/fixtures/make_family_fixtures.py writes them into fixtures/reference/&lt;arch&gt;.json/.safetensors).
/// </summary>
public class RotaryEmbeddingTests
{
    const string? FamilyFixturesPending = FamilyFixtures.Pending;

    static ModelConfig Described(JsonObject c) => ModelConfig.Parse(c, "config.json", describedToo: true);

    static Tensor Positions(params long[] p) => tensor(p).unsqueeze(0);

    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.equal(b).all().item<bool>();

    [Fact]
    public void PartialRotaryRotatesTheLeadingDimensionsAndPassesTheRestThrough()
    {
        using var _ = NewDisposeScope();
        var x = randn(2, 5, 3, 16, generator: new Generator(1));
        var angles = randn(2, 5, 6, generator: new Generator(2));
        var (cos, sin) = (cat([angles, angles], -1).cos(), cat([angles, angles], -1).sin()); // rotary_dim 12 of 16
        var y = RotaryEmbedding.Apply(x, cos, sin);
        var leading = RotaryEmbedding.Apply(x[TensorIndex.Ellipsis, TensorIndex.Slice(0, 12)].contiguous(), cos, sin);
        Assert.True(Same(y[TensorIndex.Ellipsis, TensorIndex.Slice(0, 12)], leading));
        Assert.True(Same(y[TensorIndex.Ellipsis, TensorIndex.Slice(12)], x[TensorIndex.Ellipsis, TensorIndex.Slice(12)]));
        Assert.False(leading.allclose(x[TensorIndex.Ellipsis, TensorIndex.Slice(0, 12)])); // the rotation did something
    }

    [Fact]
    public void LongRopeUsesShortFactorsUpToTheOriginalLengthAndLongFactorsPastIt()
    {
        using var _ = NewDisposeScope();
        var config = Described(FamilyConfigs.Phi4MiniV5());
        var lr = (LongRopeScaling)config.RopeFor(0).Scaling!;
        using var rope = new RotaryEmbedding(config, CPU);
        // The same base without scaling: each scaled frequency is the plain one divided by its factor.
        var plainJson = FamilyConfigs.Phi4MiniV5();
        plainJson["rope_parameters"] = JsonNode.Parse("{\"rope_type\": \"default\", \"rope_theta\": 10000.0, \"partial_rotary_factor\": 0.75}");
        using var plain = new RotaryEmbedding(Described(plainJson), CPU);
        Assert.Equal(config.RopeFor(0).RotaryDim / 2, plain.InvFreq().shape[0]);
        var shortF = tensor(lr.ShortFactor.Select(x => (float)x).ToArray());
        var longF = tensor(lr.LongFactor.Select(x => (float)x).ToArray());
        Assert.True(Close.RelError(rope.InvFreq() * shortF, plain.InvFreq()) <= 1e-6);
        Assert.True(Close.RelError(rope.InvFreq(@long: true) * longF, plain.InvFreq()) <= 1e-6);

        int original = lr.OriginalMaxPositionEmbeddings;
        foreach (var (positions, useLong) in new[] { (new long[] { 0, 7, original - 1 }, false), (new long[] { 0, 7, original }, true) })
        {
            var (cos, sin) = rope.CosSin(Positions(positions), ScalarType.Float32);
            Assert.Equal(config.RopeFor(0).RotaryDim, cos.shape[^1]);
            var freqs = Positions(positions).to(ScalarType.Float32).unsqueeze(-1) * rope.InvFreq(@long: useLong);
            var emb = cat([freqs, freqs], -1);
            Assert.True(Close.RelError(cos, emb.cos() * lr.AttentionFactor) <= 1e-6, $"cos, long={useLong}");
            Assert.True(Close.RelError(sin, emb.sin() * lr.AttentionFactor) <= 1e-6, $"sin, long={useLong}");
        }
    }

    [Fact]
    public void LongRopeChoosesOnceForTheWholeBatch()
    {
        using var _ = NewDisposeScope();
        var config = Described(FamilyConfigs.Phi4MiniV5());
        int original = ((LongRopeScaling)config.RopeFor(0).Scaling!).OriginalMaxPositionEmbeddings;
        using var rope = new RotaryEmbedding(config, CPU);
        var shortRow = Positions(0, 1, 2);
        var batch = cat([shortRow, Positions(0, 1, original)], 0);
        var (alone, _) = rope.CosSin(shortRow, ScalarType.Float32);
        var (inBatch, _) = rope.CosSin(batch, ScalarType.Float32);
        // transformers takes max(position_ids) + 1 over the batch: a short row next to a long one gets the long factors.
        Assert.False(inBatch[0].allclose(alone[0]));
    }

    [Fact]
    public void Gemma3SlidingLayersUseTheLocalBaseAndFullLayersTheScaledGlobalOne()
    {
        using var _ = NewDisposeScope();
        var config = Described(FamilyConfigs.Gemma3Scaled(hubForm: false));
        using var rope = new RotaryEmbedding(config, CPU);
        RotaryEmbedding PlainGemma2(double theta)
        {
            var c = FamilyConfigs.Parse(FamilyConfigs.Gemma2_2b);
            c["rope_theta"] = theta;
            return new RotaryEmbedding(Described(c), CPU); // head_dim 256, as Gemma 3 1B
        }
        using var local = PlainGemma2(10_000);
        using var global = PlainGemma2(1_000_000);
        Assert.True(Same(rope.InvFreq(ModelConfig.SlidingAttention), local.InvFreq()));
        Assert.True(Close.RelError(rope.InvFreq(ModelConfig.FullAttention) * 8, global.InvFreq()) <= 1e-6);
        var positions = Positions(0, 3, 700);
        var (fullCos, _) = rope.CosSin(positions, ScalarType.Float32, ModelConfig.FullAttention);
        var (slidingCos, _) = rope.CosSin(positions, ScalarType.Float32, ModelConfig.SlidingAttention);
        var (localCos, _) = local.CosSin(positions, ScalarType.Float32);
        Assert.True(Same(slidingCos, localCos));
        Assert.False(fullCos.allclose(slidingCos));
    }

    [Fact]
    public void CosSinIsCastToTheRequestedDtype()
    {
        using var _ = NewDisposeScope();
        using var rope = new RotaryEmbedding(Described(FamilyConfigs.Phi4MiniV5()), CPU);
        var (cos, sin) = rope.CosSin(Positions(0, 1), ScalarType.BFloat16);
        Assert.Equal((ScalarType.BFloat16, ScalarType.BFloat16), (cos.dtype, sin.dtype));
    }

    // ---- against transformers' rotary modules (family fixtures) ----

    [Theory(Skip = FamilyFixturesPending)]
    [InlineData("phi3")]
    [InlineData("phi4mini")]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void TablesMatchTransformers(string arch)
    {
        using var _ = NewDisposeScope();
        var config = FamilyFixtures.Config(arch);
        using var rope = new RotaryEmbedding(config, CPU);
        var meta = Fixtures.Json("reference", arch + ".json").GetProperty("rope");
        using var file = SafetensorsFile.Open(Fixtures.Path_("reference", arch + ".safetensors"));
        foreach (var lt in meta.GetProperty("layer_types").EnumerateObject())
        {
            string type = lt.Name == "all" ? ModelConfig.FullAttention : lt.Name;
            var scaling = config.Rope[type].Scaling as LongRopeScaling;
            foreach (var set in meta.GetProperty("position_sets").EnumerateObject())
            {
                var positions = tensor(set.Value.EnumerateArray().Select(p => p.GetInt64()).ToArray()).unsqueeze(0);
                bool useLong = scaling != null && positions.max().item<long>() + 1 > scaling.OriginalMaxPositionEmbeddings;
                string key = $"rope_{lt.Name}_{set.Name}";
                Assert.True(Close.RelError(rope.InvFreq(type, useLong), file.Read(key + "_inv_freq")) <= 1e-6, key + " inv_freq");
                var (cos, sin) = rope.CosSin(positions, ScalarType.Float32, type);
                Assert.True(Close.RelError(cos, file.Read(key + "_cos")) <= 1e-6, key + " cos");
                Assert.True(Close.RelError(sin, file.Read(key + "_sin")) <= 1e-6, key + " sin");
                Assert.Equal(lt.Value.GetProperty(set.Name).GetProperty("attention_scaling").GetDouble(), scaling?.AttentionFactor ?? 1.0, 6);
            }
        }
    }

    [Theory(Skip = FamilyFixturesPending)]
    [InlineData("phi3")]
    [InlineData("phi4mini")]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void TheHubFormOfTheFixtureConfigDescribesTheSameModel(string arch)
    {
        var reference = Fixtures.Json("reference", arch + ".json");
        Assert.True(reference.GetProperty("hub_config_equivalent").GetBoolean(), "transformers itself read the two forms differently");
        var hub = Described((JsonObject)JsonNode.Parse(reference.GetProperty("hub_config").GetRawText())!);
        var saved = FamilyFixtures.Config(arch);
        Assert.Equal(hub.LayerTypes, saved.LayerTypes);
        Assert.Equal(hub.SlidingWindows, saved.SlidingWindows);
        Assert.Equal((hub.AttnLogitSoftcap, hub.FinalLogitSoftcap, hub.AttentionScale, hub.EmbeddingScale, hub.TieWordEmbeddings),
            (saved.AttnLogitSoftcap, saved.FinalLogitSoftcap, saved.AttentionScale, saved.EmbeddingScale, saved.TieWordEmbeddings));
        foreach (var type in new[] { ModelConfig.FullAttention, ModelConfig.SlidingAttention })
        {
            var (a, b) = (hub.Rope[type], saved.Rope[type]);
            Assert.Equal((a.Theta, a.RotaryDim), (b.Theta, b.RotaryDim));
            Assert.Equal(JsonSerializer.Serialize<object?>(a.Scaling), JsonSerializer.Serialize<object?>(b.Scaling));
        }
    }
}
