using LoraKit.Tokenization;

namespace LoraKit.Tests;

/// <summary>Token ids and decodes against HF tokenizers on every fixture tokenizer (made by make_fixtures.py).</summary>
public class TokenizerTests
{
    public static TheoryData<string> Names => new(Fixtures.Tokenizers);

    [Theory]
    [MemberData(nameof(Names))]
    public void IdsAndDecodesMatchHuggingFace(string name)
    {
        var tok = Tokenizer.Load(Fixtures.Path_("tokenizers", name));
        foreach (var probe in Fixtures.Json("tokenizers", name, "probes.json").EnumerateArray())
        {
            string text = probe.GetProperty("text").GetString()!;
            var expected = Fixtures.Ids(probe.GetProperty("ids")).Select(x => (int)x).ToArray();
            Assert.True(expected.SequenceEqual(tok.Encode(text)),
                $"{name} {Show(text)}: expected [{string.Join(",", expected)}] got [{string.Join(",", tok.Encode(text))}]");
            var plain = Fixtures.Ids(probe.GetProperty("ids_no_special")).Select(x => (int)x).ToArray();
            Assert.Equal(plain, tok.Encode(text, addSpecialTokens: false));
            Assert.Equal(probe.GetProperty("decoded").GetString(), tok.Decode(expected));
            Assert.Equal(probe.GetProperty("decoded_skip_special").GetString(), tok.Decode(expected, skipSpecialTokens: true));
        }
    }

    [Theory]
    [MemberData(nameof(ModelArchs))]
    public void ModelTokenizersGiveTheReferenceInputIds(string arch)
    {
        var tok = Tokenizer.Load(Fixtures.Model(arch));
        foreach (var text in Fixtures.Json("reference", arch + ".json").GetProperty("texts").EnumerateArray())
            Assert.Equal(Fixtures.Ids(text.GetProperty("input_ids")).Select(x => (int)x), tok.Encode(text.GetProperty("text").GetString()!));
    }

    public static TheoryData<string> ModelArchs => new(Fixtures.Architectures.Concat(FamilyFixtures.Built));

    static string Show(string s) => System.Text.Json.JsonSerializer.Serialize(s);
}

public class TokenizerNormalizationTests
{
    [Fact]
    public void NfcNormalizerComposesDecomposedInput()
    {
        // Qwen's tokenizer.json has an NFC normalizer: decomposed "e + combining acute" must encode like "é".
        var tok = Tokenizer.Load(Fixtures.Path_("tokenizers", "qwen2"));
        Assert.Equal(tok.Encode("Caf\u00e9"), tok.Encode("Cafe\u0301"));
        var gpt2 = Tokenizer.Load(Fixtures.Path_("tokenizers", "gpt2")); // no normalizer: they differ
        Assert.NotEqual(gpt2.Encode("Caf\u00e9"), gpt2.Encode("Cafe\u0301"));
    }
}
