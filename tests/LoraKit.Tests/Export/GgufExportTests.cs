using LoraKit.Export;
using LoraKit.Generation;
using static TorchSharp.torch;

namespace LoraKit.Tests.Export;

/// <summary>
/// <c>lorakit export gguf</c> checked by the real client: llama.cpp (LLamaSharp 0.30, CPU) loads the exported merged
/// model, and separately the base GGUF with the adapter's LoRA GGUF.
/// <list type="bullet">
/// <item>f32 exports: llama.cpp's greedy tokens (decoding freely from LoraKit's prompt ids) equal LoraKit's greedy
/// tokens (TextGenerator on the same model + adapter), and its logits match LoraKit's fp32 logits to 1e-3 of their
/// range at every step.</item>
/// <item>f16 and q8_0 exports: the fixtures are tiny random models whose logits are nearly flat, so f16 rounding
/// (≈0.04 here) often exceeds the gap between the two best tokens and free-running token equality would be a coin
/// toss. These are compared teacher-forced on LoraKit's sequence: logits within a tolerance of their range, and
/// the same argmax wherever LoraKit's top-2 gap exceeds twice the observed logit error.</item>
/// </list>
/// The prompt ids come from LoraKit's tokenizer, so the comparison does not depend on llama.cpp's tokenizer.
/// </summary>
public sealed class GgufExportTests : IDisposable
{
    /// <summary>The fixture architectures llama.cpp runs (Gemma 2/3 are refused: see GgufArchitecture.For).</summary>
    public static TheoryData<string> Architectures => new() { "llama", "mistral", "qwen2", "qwen3", "phi3", "phi4mini" };

    const int NewTokens = 8;

    /// <summary>
    /// Short enough for Mistral's 24-token sliding window (llama.cpp's "llama" runs full attention). Phi-4-mini's fixture
    /// has LongRoPE with an original context of 64: transformers picks the short factors below 64 positions, llama.cpp
    /// picks by context size and pads every context to 256, so its prompt is longer than 64 tokens (long factors in both).
    /// </summary>
    static string Prompt(string arch) => arch == "phi4mini"
        ? string.Concat(Enumerable.Repeat("The quick brown fox jumps over the lazy dog. ", 8))
        : "The quick brown fox jumps";

    readonly string _dir = Directory.CreateTempSubdirectory("lorakit-gguf-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Theory, MemberData(nameof(Architectures))]
    public void MergedModelDecodesAsLoraKit(string arch)
    {
        var run = LoraKitGreedy(arch);
        var gguf = Export(arch, merged: true, GgufFileType.F32);
        AssertSameGreedy(run, LlamaCpp.Greedy(gguf, null, run.Prompt, NewTokens), arch + " merged f32");
    }

    [Theory, MemberData(nameof(Architectures))]
    public void BasePlusLoraDecodesAsLoraKit(string arch)
    {
        var run = LoraKitGreedy(arch);
        var (baseGguf, lora) = (Export(arch, merged: false, GgufFileType.F32), ExportLora(arch, GgufFileType.F32));
        AssertSameGreedy(run, LlamaCpp.Greedy(baseGguf, lora, run.Prompt, NewTokens), arch + " base + LoRA f32");
    }

    [Theory, MemberData(nameof(Architectures))]
    public void F16ExportsScoreAsLoraKit(string arch)
    {
        var run = LoraKitGreedy(arch);
        var ids = run.Prompt.Concat(run.Tokens).ToArray();
        AssertClose(run, LlamaCpp.Score(Export(arch, merged: true, GgufFileType.F16), null, ids, run.Prompt.Length), 0.05f, 0.5, arch + " merged f16");
        var (baseGguf, lora) = (Export(arch, merged: false, GgufFileType.F16), ExportLora(arch, GgufFileType.F16));
        AssertClose(run, LlamaCpp.Score(baseGguf, lora, ids, run.Prompt.Length), 0.05f, 0.5, arch + " base + LoRA f16");
    }

    /// <summary>
    /// q8_0 loads and scores close: llama.cpp also quantizes the activations to 8 bits in its q8_0 matmuls, so on these
    /// near-flat random logits the error reaches ~20% of the range and no step's top-2 gap is reliably above it.
    /// </summary>
    [Theory, InlineData("llama"), InlineData("qwen3")]
    public void Q8_0ExportLoadsAndMostlyAgrees(string arch)
    {
        var run = LoraKitGreedy(arch);
        var ids = run.Prompt.Concat(run.Tokens).ToArray();
        AssertClose(run, LlamaCpp.Score(Export(arch, merged: true, GgufFileType.Q8_0), null, ids, run.Prompt.Length), 0.3f, 0, arch + " merged q8_0");
    }

    /// <summary>bf16 keeps 8 bits of mantissa (f16: 11), so its logits are compared with a looser tolerance than f16's.</summary>
    [Theory, InlineData("mistral"), InlineData("phi3")]
    public void Bf16ExportScoresAsLoraKit(string arch)
    {
        var run = LoraKitGreedy(arch);
        var ids = run.Prompt.Concat(run.Tokens).ToArray();
        AssertClose(run, LlamaCpp.Score(Export(arch, merged: true, GgufFileType.BF16), null, ids, run.Prompt.Length), 0.1f, 0, arch + " merged bf16");
    }

    string Export(string arch, bool merged, GgufFileType type)
    {
        var path = Path.Combine(_dir, $"{arch}-{(merged ? "merged" : "base")}-{type}.gguf");
        GgufExport.Model(Fixtures.Model(arch), merged ? Adapter(arch) : null, path, type);
        return path;
    }

    string ExportLora(string arch, GgufFileType type)
    {
        var path = Path.Combine(_dir, $"{arch}-lora-{type}.gguf");
        GgufExport.Adapter(Fixtures.Model(arch), Adapter(arch), path, type);
        return path;
    }

    static string Adapter(string arch) => Fixtures.Path_("adapters", arch, "a");

    /// <summary>LoraKit's prompt ids, greedy tokens and the fp32 logits each token was chosen from.</summary>
    internal sealed record Run(int[] Prompt, int[] Tokens, float[][] Logits);

    /// <summary>LoraKit's greedy run: TextGenerator (EOS not stopping), then the logits of the whole sequence in one forward.</summary>
    static Run LoraKitGreedy(string arch)
    {
        using var model = LoraKitModel.FromPretrained(Fixtures.Model(arch), "cpu", "fp32").WithAdapter(Adapter(arch));
        var prompt = model.Tokenizer.Encode(Prompt(arch));
        var result = new TextGenerator(model.Model, model.Tokenizer).Generate(prompt, new SamplingOptions { MaxNewTokens = NewTokens, EosTokenIds = [] });
        Assert.Equal(NewTokens, result.OutputIds.Length);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var all = prompt.Concat(result.OutputIds).Select(x => (long)x).ToArray();
        var rows = model.Model.Logits(tensor(all).unsqueeze(0), null, null)[0];
        var logits = Enumerable.Range(prompt.Length - 1, NewTokens).Select(t => rows[t].to(ScalarType.Float32).data<float>().ToArray()).ToArray();
        return new Run(prompt, result.OutputIds, logits);
    }

    /// <summary>Free-running greedy decode: every token equal, logits within 1e-3 of their range.</summary>
    static void AssertSameGreedy(Run want, LlamaCpp.Decode got, string what)
    {
        for (int step = 0; step < want.Tokens.Length; step++)
        {
            var (diff, scale, gap) = Compare(want.Logits[step], got.Logits[step], what);
            Assert.True(diff <= 1e-3f * scale, $"{what}, step {step}: max |logit difference| {diff:g3} > 1e-3 × {scale:g3}");
            Assert.True(gap > 2 * diff, $"{what}, step {step}: LoraKit's two best logits are {gap:g3} apart, within the export's error {diff:g3}; choose another prompt");
            Assert.True(want.Tokens[step] == got.Tokens[step],
                $"{what}, step {step}: llama.cpp chose {got.Tokens[step]}, LoraKit {want.Tokens[step]} (LoraKit [{string.Join(",", want.Tokens)}], llama.cpp [{string.Join(",", got.Tokens)}])");
        }
    }

    /// <summary>
    /// Teacher-forced logits within <paramref name="tolerance"/> of their range; the argmax equal to LoraKit's token at
    /// every step whose top-2 gap exceeds twice the error, and at <paramref name="minDecided"/> of the steps at least.
    /// </summary>
    static void AssertClose(Run want, float[][] got, float tolerance, double minDecided, string what)
    {
        int decided = 0;
        for (int step = 0; step < want.Tokens.Length; step++)
        {
            var (diff, scale, gap) = Compare(want.Logits[step], got[step], what);
            Assert.True(diff <= tolerance * scale, $"{what}, step {step}: max |logit difference| {diff:g3} > {tolerance} × {scale:g3}");
            if (gap <= 2 * diff) continue;
            decided++;
            Assert.True(LlamaCpp.ArgMax(got[step]) == want.Tokens[step], $"{what}, step {step}: llama.cpp's best token {LlamaCpp.ArgMax(got[step])}, LoraKit's {want.Tokens[step]} (gap {gap:g3}, error {diff:g3})");
        }
        Assert.True(decided >= minDecided * want.Tokens.Length, $"{what}: only {decided} of {want.Tokens.Length} steps had a top-2 gap above the export's error");
    }

    /// <summary>Max |difference| over LoraKit's vocabulary, the logits' range (max |logit|) and LoraKit's top-2 gap.</summary>
    static (float diff, float scale, float gap) Compare(float[] want, float[] have, string what)
    {
        Assert.True(want.Length <= have.Length, $"{what}: llama.cpp has {have.Length} logits, LoraKit {want.Length}");
        float diff = 0;
        for (int i = 0; i < want.Length; i++) diff = MathF.Max(diff, MathF.Abs(want[i] - have[i]));
        var top = want.OrderDescending().Take(2).ToArray();
        return (diff, want.Max(MathF.Abs), top[0] - top[1]);
    }
}
