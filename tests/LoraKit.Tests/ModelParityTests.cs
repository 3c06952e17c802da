using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>Logits and losses of every architecture against transformers (fp32, CPU).</summary>
public class ModelParityTests
{
    public static TheoryData<string> Archs => new(Fixtures.Architectures);

    [Theory]
    [MemberData(nameof(Archs))]
    public void Fp32LogitsAndLossMatchTransformers(string arch)
    {
        using var model = CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU);
        var reference = Fixtures.Json("reference", arch + ".json");
        int i = 0;
        foreach (var text in reference.GetProperty("texts").EnumerateArray())
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            var ids = tensor(Fixtures.Ids(text.GetProperty("input_ids"))).unsqueeze(0);
            var logits = model.Logits(ids, null, null)[0];
            var expected = Fixtures.ReferenceTensor(arch, $"logits_{i}");
            double rel = Close.RelError(logits, expected);
            Assert.True(rel <= 1e-4, $"{arch} text {i}: logits relative error {rel:E2} > 1e-4");
            double loss = model.Loss(ids).item<float>();
            double refLoss = text.GetProperty("loss").GetDouble();
            Assert.True(Math.Abs(loss - refLoss) <= 1e-4 * Math.Abs(refLoss), $"{arch} text {i}: loss {loss} vs {refLoss}");
            i++;
        }
        Assert.Equal(3, i);
    }
}
