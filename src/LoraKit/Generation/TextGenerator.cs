using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Generation;

public enum FinishReason { Length, Stop }

public sealed record GenerationResult(int[] PromptIds, int[] OutputIds, string Text, FinishReason FinishReason);

/// <summary>Autoregressive decoding with a KV cache; one dispose scope per step keeps native memory flat.</summary>
public sealed class TextGenerator(CausalLM model, Tokenizer tokenizer)
{
    /// <summary>Generates from a prompt; <paramref name="onText"/> receives each new piece of decoded text.</summary>
    public GenerationResult Generate(int[] promptIds, SamplingOptions options, Action<string>? onText = null)
    {
        if (promptIds.Length == 0) throw new ArgumentException("the prompt encodes to no tokens; nothing to condition on");
        var sampler = new Sampler(options);
        var output = new List<int>();
        string emitted = "";
        var finish = FinishReason.Length;
        using var cache = new KvCache(model.Config.NumHiddenLayers);
        using var _ = no_grad();
        int[] step = promptIds;
        for (int i = 0; i < options.MaxNewTokens; i++)
        {
            int next;
            using (var scope = NewDisposeScope())
            {
                var ids = tensor(step.Select(x => (long)x).ToArray(), device: model.Device).unsqueeze(0);
                var logits = model.Logits(ids, null, cache);
                next = sampler.Next(logits[0, -1]);
            }
            output.Add(next);
            step = [next];

            string text = tokenizer.Decode(output, skipSpecialTokens: true);
            int cut = FirstStop(text, options.StopStrings);
            if (cut >= 0)
            {
                EmitNew(text[..cut]);
                finish = FinishReason.Stop;
                break;
            }
            // Hold back a trailing U+FFFD: it may be half of a multi-byte character that the next token completes.
            EmitNew(text.EndsWith('\uFFFD') ? text[..^1] : text);
            if (options.EosTokenIds.Contains(next)) { finish = FinishReason.Stop; break; }
        }
        string final = tokenizer.Decode(output, skipSpecialTokens: true);
        int stopAt = FirstStop(final, options.StopStrings);
        if (stopAt >= 0) final = final[..stopAt];
        EmitNew(final);
        return new GenerationResult(promptIds, output.ToArray(), final, finish);

        void EmitNew(string text)
        {
            if (onText is null || text.Length <= emitted.Length || !text.StartsWith(emitted, StringComparison.Ordinal)) return;
            onText(text[emitted.Length..]);
            emitted = text;
        }
    }

    static int FirstStop(string text, IReadOnlyList<string> stops)
    {
        int best = -1;
        foreach (var s in stops)
        {
            int k = text.IndexOf(s, StringComparison.Ordinal);
            if (k >= 0 && (best < 0 || k < best)) best = k;
        }
        return best;
    }
}
