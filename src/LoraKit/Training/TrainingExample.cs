using System.Text.Json.Nodes;
using LoraKit.Tokenization;

namespace LoraKit.Training;

/// <summary>
/// One in-memory training example, in one of the shapes a JSONL training file allows: plain text (loss on every token),
/// a prompt and its completion (loss on the completion), or a conversation rendered by the model's chat template (loss
/// on the assistant turns). The in-memory <see cref="Trainer"/> tokenises it exactly as it would the same JSON line.
/// </summary>
public sealed record TrainingExample
{
    /// <summary>{"text"}: the whole text is trained.</summary>
    public string? Text { get; init; }
    /// <summary>{"prompt","completion"}: the prompt conditions, the completion is trained.</summary>
    public string? Prompt { get; init; }
    /// <summary>The trained part of a prompt/completion example.</summary>
    public string? Completion { get; init; }
    /// <summary>{"messages"}: a conversation; its assistant turns are trained.</summary>
    public IReadOnlyList<ChatTurn>? Messages { get; init; }

    /// <summary>A plain-text example.</summary>
    public static TrainingExample FromText(string text) => new() { Text = text };

    /// <summary>A prompt and the completion the model should learn to produce for it.</summary>
    public static TrainingExample FromPrompt(string prompt, string completion) => new() { Prompt = prompt, Completion = completion };

    /// <summary>A conversation; the assistant turns are what the model learns.</summary>
    public static TrainingExample FromChat(params IEnumerable<ChatTurn> turns) => new() { Messages = turns.ToList() };

    /// <summary>The example as the JSONL line that means the same (the one tokenisation path for files and memory).</summary>
    public string ToJsonLine()
    {
        var o = new JsonObject();
        if (Messages is not null)
            o["messages"] = new JsonArray(Messages.Select(m => (JsonNode)new JsonObject { ["role"] = m.Role, ["content"] = m.Content }).ToArray());
        if (Prompt is not null) o["prompt"] = Prompt;
        if (Completion is not null) o["completion"] = Completion;
        if (Text is not null) o["text"] = Text;
        return o.ToJsonString();
    }
}
