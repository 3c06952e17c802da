using LLama;
using LLama.Common;
using LLama.Native;

namespace LoraKit.Tests.Export;

/// <summary>
/// The real client: llama.cpp through LLamaSharp 0.30 (CPU backend) loads a GGUF file (optionally a LoRA GGUF over it)
/// and decodes greedily from given token ids, so the comparison with LoraKit does not depend on either tokenizer.
/// </summary>
public static class LlamaCpp
{
    static readonly Lazy<bool> Quiet = new(() =>
    {
        // llama.cpp logs every load to stderr; keep errors only (before the native library loads, or it is too late).
        NativeLibraryConfig.All.WithLogCallback((level, message) => { if (level == LLamaLogLevel.Error) Console.Error.Write(message); });
        return true;
    });

    /// <summary>What one greedy decode gave: the new tokens and the logits of every step (the prompt's last position first).</summary>
    // The KV cache in f32 (llama.cpp's default is f16), so an f32 export is compared with LoraKit at f32 precision.
    public sealed record Decode(int[] Tokens, float[][] Logits);

    /// <summary>Greedy decoding of <paramref name="newTokens"/> tokens after <paramref name="prompt"/> (EOS does not stop it).</summary>
    public static Decode Greedy(string modelPath, string? loraPath, int[] prompt, int newTokens)
    {
        _ = Quiet.Value;
        var p = new ModelParams(modelPath) { ContextSize = 256, GpuLayerCount = 0, Threads = 2, BatchThreads = 2, BatchSize = 256, TypeK = GGMLType.GGML_TYPE_F32, TypeV = GGMLType.GGML_TYPE_F32, FlashAttention = false };
        using var weights = LLamaWeights.LoadFromFile(p);
        using var context = weights.CreateContext(p);
        LoraAdapter? lora = loraPath is null ? null : weights.NativeHandle.LoadLoraFromFile(loraPath);
        if (lora is LoraAdapter a) context.NativeHandle.SetLoraAdapters(new[] { (a, 1f) }.AsSpan());

        var batch = new LLamaBatch();
        for (int i = 0; i < prompt.Length; i++) batch.Add((LLamaToken)prompt[i], i, LLamaSeqId.Zero, i == prompt.Length - 1);
        var tokens = new List<int>();
        var logits = new List<float[]>();
        int pos = prompt.Length;
        for (int step = 0; step < newTokens; step++)
        {
            var result = context.NativeHandle.Decode(batch);
            if (result != DecodeResult.Ok) throw new InvalidOperationException($"llama_decode: {result}");
            var row = context.NativeHandle.GetLogitsIth(batch.TokenCount - 1).ToArray();
            logits.Add(row);
            int next = ArgMax(row);
            tokens.Add(next);
            batch.Clear();
            batch.Add((LLamaToken)next, pos++, LLamaSeqId.Zero, true);
        }
        return new Decode([.. tokens], [.. logits]);
    }

    /// <summary>
    /// Teacher-forced: the logits llama.cpp gives after each prefix <c>ids[..k]</c> for k from <paramref name="from"/> to
    /// ids.Length - 1 (one decode of the whole sequence), so an early difference cannot change what is compared later.
    /// </summary>
    public static float[][] Score(string modelPath, string? loraPath, int[] ids, int from)
    {
        _ = Quiet.Value;
        var p = new ModelParams(modelPath) { ContextSize = 256, GpuLayerCount = 0, Threads = 2, BatchThreads = 2, BatchSize = 256, TypeK = GGMLType.GGML_TYPE_F32, TypeV = GGMLType.GGML_TYPE_F32, FlashAttention = false };
        using var weights = LLamaWeights.LoadFromFile(p);
        using var context = weights.CreateContext(p);
        LoraAdapter? lora = loraPath is null ? null : weights.NativeHandle.LoadLoraFromFile(loraPath);
        if (lora is LoraAdapter a) context.NativeHandle.SetLoraAdapters(new[] { (a, 1f) }.AsSpan());
        var batch = new LLamaBatch();
        for (int i = 0; i < ids.Length - 1; i++) batch.Add((LLamaToken)ids[i], i, LLamaSeqId.Zero, i >= from - 1);
        var result = context.NativeHandle.Decode(batch);
        if (result != DecodeResult.Ok) throw new InvalidOperationException($"llama_decode: {result}");
        return Enumerable.Range(from - 1, ids.Length - from).Select(i => context.NativeHandle.GetLogitsIth(i).ToArray()).ToArray();
    }

    /// <summary>Metadata value of <paramref name="key"/> as llama.cpp read it (null if absent).</summary>
    public static string? Metadata(string modelPath, string key)
    {
        _ = Quiet.Value;
        using var weights = LLamaWeights.LoadFromFile(new ModelParams(modelPath) { GpuLayerCount = 0 });
        return weights.Metadata.TryGetValue(key, out var v) ? v : null;
    }

    /// <summary>llama.cpp's tokenization of <paramref name="text"/> (with its BOS rule).</summary>
    public static int[] Tokenize(string modelPath, string text)
    {
        _ = Quiet.Value;
        using var weights = LLamaWeights.LoadFromFile(new ModelParams(modelPath) { GpuLayerCount = 0 });
        return weights.Tokenize(text, true, false, System.Text.Encoding.UTF8).Select(t => (int)t).ToArray();
    }

    public static int ArgMax(ReadOnlySpan<float> row)
    {
        int best = 0;
        for (int i = 1; i < row.Length; i++) if (row[i] > row[best]) best = i;
        return best;
    }
}
