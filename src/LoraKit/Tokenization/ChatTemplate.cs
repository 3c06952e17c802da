using System.Text.Json;
using LoraKit.Templating;

namespace LoraKit.Tokenization;

/// <summary>
/// A model's chat template (Jinja, as in tokenizer_config.json), rendered like transformers' apply_chat_template:
/// trim_blocks and lstrip_blocks on, <c>messages</c>, <c>add_generation_prompt</c>, the special tokens and
/// <c>raise_exception</c>/<c>strftime_now</c> in scope.
/// </summary>
public sealed class ChatTemplate
{
    readonly List<Node> _nodes;

    public string Source { get; }

    /// <summary>The tokenizer's chat template (tokenizer_config.json), or null when it has none.</summary>
    public static ChatTemplate? Of(Tokenizer tokenizer) =>
        tokenizer.Config.ChatTemplate is string source ? new ChatTemplate(source) : null;

    public ChatTemplate(string source)
    {
        Source = source;
        _nodes = Parser.Parse(source);
    }

    public string Render(IEnumerable<ChatTurn> messages, bool addGenerationPrompt, TokenizerConfig tokens,
        IReadOnlyDictionary<string, object?>? extra = null)
    {
        var list = messages.Select(m => (object?)new Dictionary<string, object?> { ["role"] = m.Role, ["content"] = m.Content }).ToList();
        return RenderValues(list, addGenerationPrompt, tokens, extra);
    }

    /// <summary>Renders messages given as JSON (so tool calls and other fields pass through unchanged).</summary>
    public string Render(JsonElement messages, bool addGenerationPrompt, TokenizerConfig tokens, IReadOnlyDictionary<string, object?>? extra = null)
    {
        if (PyValues.FromJson(messages) is not List<object?> list) throw new ArgumentException("messages must be a JSON array");
        return RenderValues(list, addGenerationPrompt, tokens, extra);
    }

    string RenderValues(List<object?> messages, bool addGenerationPrompt, TokenizerConfig tokens, IReadOnlyDictionary<string, object?>? extra)
    {
        var globals = new Dictionary<string, object?>
        {
            ["messages"] = messages,
            ["add_generation_prompt"] = addGenerationPrompt,
            ["bos_token"] = tokens.BosToken ?? "",
            ["eos_token"] = tokens.EosToken ?? "",
            ["pad_token"] = tokens.PadToken ?? "",
            ["unk_token"] = tokens.UnkToken ?? "",
        };
        if (extra != null) foreach (var kv in extra) globals[kv.Key] = kv.Value;
        return new Interpreter(globals).Render(_nodes);
    }
}
