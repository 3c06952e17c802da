using System.Text.Json.Nodes;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

public class ModelConfigTests
{
    static JsonObject Config(string arch) => (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Model(arch), "config.json")))!;

    [Theory]
    [InlineData("GPT2LMHeadModel", "unsupported architecture 'GPT2LMHeadModel'")]
    [InlineData("MixtralForCausalLM", "unsupported architecture 'MixtralForCausalLM'")]
    public void UnsupportedArchitectureIsNamed(string arch, string fragment)
    {
        var c = Config("llama");
        c["architectures"] = new JsonArray(arch);
        Assert.Contains(fragment, Assert.Throws<ModelConfigException>(() => ModelConfig.Parse(c)).Message);
    }

    [Theory]
    [InlineData("hidden_act", "\"gelu\"", "unsupported hidden_act 'gelu'")]
    [InlineData("rope_parameters", "{\"rope_type\": \"yarn\", \"factor\": 4.0, \"rope_theta\": 10000.0}", "unsupported rope scaling type 'yarn'")]
    [InlineData("num_key_value_heads", "3", "not a multiple")]
    [InlineData("pretraining_tp", "2", "unsupported pretraining_tp 2")]
    [InlineData("hidden_size", "\"big\"", "'hidden_size' must be an integer")]
    public void UnsupportedSettingsAreNamed(string key, string json, string fragment)
    {
        var c = Config("llama");
        c[key] = JsonNode.Parse(json);
        Assert.Contains(fragment, Assert.Throws<ModelConfigException>(() => ModelConfig.Parse(c)).Message);
    }

    [Fact]
    public void MissingRequiredFieldIsNamed()
    {
        var c = Config("qwen2");
        c.Remove("intermediate_size");
        Assert.Contains("'intermediate_size'", Assert.Throws<ModelConfigException>(() => ModelConfig.Parse(c)).Message);
    }

    [Fact]
    public void OldStyleRopeScalingLoadsTheSameModel()
    {
        // transformers < 5 wrote rope_theta at the top level and the Llama-3 scaling under "rope_scaling".
        var c = Config("llama");
        var p = (JsonObject)c["rope_parameters"]!;
        c.Remove("rope_parameters");
        c["rope_theta"] = p["rope_theta"]!.DeepClone();
        p.Remove("rope_theta");
        c["rope_scaling"] = p;
        var dir = Fixtures.CopyOf(Fixtures.Model("llama"));
        File.WriteAllText(Path.Combine(dir, "config.json"), c.ToJsonString());

        using var model = CausalLM.Load(dir, ScalarType.Float32, CPU);
        Assert.NotNull(model.Config.RopeScaling);
        var text = Fixtures.Json("reference", "llama.json").GetProperty("texts")[2];
        using var _ = no_grad();
        var logits = model.Logits(tensor(Fixtures.Ids(text.GetProperty("input_ids"))).unsqueeze(0), null, null)[0];
        Assert.True(Close.RelError(logits, Fixtures.ReferenceTensor("llama", "logits_2")) <= 1e-4);
    }

    [Fact]
    public void ParsesEachArchitecturesSpecifics()
    {
        var qwen2 = ModelConfig.Load(Fixtures.Model("qwen2"));
        Assert.True(qwen2.QkvBias && !qwen2.OProjBias && qwen2.TieWordEmbeddings);
        var qwen3 = ModelConfig.Load(Fixtures.Model("qwen3"));
        Assert.True(qwen3.QkNorm && qwen3.HeadDim == 32 && qwen3.HeadDim * qwen3.NumAttentionHeads != qwen3.HiddenSize);
        var mistral = ModelConfig.Load(Fixtures.Model("mistral"));
        Assert.All(mistral.SlidingWindows, w => Assert.Equal(24, w));
        var llama = ModelConfig.Load(Fixtures.Model("llama"));
        Assert.Equal(new Llama3RopeScaling(8, 1, 4, 64), llama.RopeScaling);
        Assert.Equal(500000, llama.RopeTheta);
    }
}
