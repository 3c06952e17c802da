using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>Logits and losses of every architecture against transformers (fp32, CPU).</summary>
public class ModelParityTests
{
    public static TheoryData<string> Archs => new(Fixtures.Architectures.Concat(FamilyFixtures.Built));

    public static TheoryData<string> Families => new(FamilyFixtures.Built);

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

    /// <summary>
    /// bf16 (on CPU) against transformers' bf16 logits (made on CUDA) for Gemma, whose dtype-sensitive steps (the
    /// (1 + w) norm before the cast, the embedding scale rounded to bf16, soft-caps in bf16) this checks within the bf16
    /// tolerance. (Phi-3's fixtures land at 1.1-1.2e-2 here: CPU and CUDA bf16 kernels round differently.)
    /// </summary>
    [Theory]
    [InlineData("gemma2")]
    [InlineData("gemma3")]
    public void Bf16LogitsMatchTransformers(string arch)
    {
        using var model = CausalLM.Load(Fixtures.Model(arch), ScalarType.BFloat16, CPU);
        int i = 0;
        foreach (var text in Fixtures.Json("reference", arch + ".json").GetProperty("texts").EnumerateArray())
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            var ids = tensor(Fixtures.Ids(text.GetProperty("input_ids"))).unsqueeze(0);
            var logits = model.Logits(ids, null, null)[0].to(ScalarType.Float32);
            double rel = Close.RelError(logits, Fixtures.ReferenceTensor(arch, $"logits_bf16_{i}"));
            Assert.True(rel <= 1e-2, $"{arch} text {i}: bf16 logits relative error {rel:E2} > 1e-2");
            i++;
        }
    }

    /// <summary>
    /// Left-padded batches with transformers' attention mask and position ids: the logits of the real positions match
    /// (padding rows' values are meaningless). Phi-4-mini's first batch mixes a short row with one past
    /// original_max_position_embeddings, so the whole batch uses LongRoPE's long factors, as transformers decides.
    /// </summary>
    [Theory]
    [MemberData(nameof(Families))]
    public void Fp32PaddedBatchesMatchTransformersUnderTheMask(string arch)
    {
        using var model = CausalLM.Load(Fixtures.Model(arch), ScalarType.Float32, CPU);
        int j = 0;
        foreach (var batch in Fixtures.Json("reference", arch + ".json").GetProperty("batches").EnumerateArray())
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            var ids = Rows(batch.GetProperty("input_ids"));
            var mask = Rows(batch.GetProperty("attention_mask"));
            var positions = Rows(batch.GetProperty("position_ids"));
            var logits = model.Logits(ids, mask, null, positions);
            var expected = Fixtures.ReferenceTensor(arch, $"batch_{j}");
            var real = mask.to(ScalarType.Bool);
            double rel = Close.RelError(logits[real], expected[real]);
            Assert.True(rel <= 1e-4, $"{arch} batch {j}: logits relative error {rel:E2} > 1e-4");
            // The positions LoraKit derives from the mask itself are transformers' too.
            double own = Close.RelError(model.Logits(ids, mask, null)[real], expected[real]);
            Assert.True(own <= 1e-4, $"{arch} batch {j} (positions from the mask): relative error {own:E2} > 1e-4");
            j++;
        }
        Assert.Equal(2, j);
    }

    static Tensor Rows(System.Text.Json.JsonElement rows) =>
        stack(rows.EnumerateArray().Select(r => tensor(Fixtures.Ids(r))).ToArray());
}
