using LoraKit.Tokenization;

namespace LoraKit.Evaluation;

/// <summary>What a case measures, and so how the gate treats it (see <see cref="GateResult.Decide"/>).</summary>
public enum CaseKind
{
    /// <summary>The adapter's own job: the gate can ask for a minimum pass rate.</summary>
    Task,
    /// <summary>What the base could already do: the pass rate must not drop much.</summary>
    Capability,
    /// <summary>What must stay safe: no case that passes on the base may fail with the adapter.</summary>
    Safety,
}

/// <summary>
/// One line of a suite file. Exactly one of <see cref="Prompt"/> (raw text, encoded with the tokenizer's special
/// tokens), <see cref="Messages"/> (a conversation, rendered by the model's chat template with the generation prompt)
/// or <see cref="Text"/> (a perplexity case: scored by mean next-token NLL, no expectation) is set.
/// </summary>
public sealed record EvalCase
{
    /// <summary>Unique within its suite.</summary>
    public required string Id { get; init; }
    public required CaseKind Kind { get; init; }
    public string? Prompt { get; init; }
    public IReadOnlyList<ChatTurn>? Messages { get; init; }
    /// <summary>A perplexity case's text.</summary>
    public string? Text { get; init; }
    /// <summary>Null only for perplexity cases.</summary>
    public Expectation? Expect { get; init; }
    /// <summary>New tokens for generated cases (default 64).</summary>
    public int MaxTokens { get; init; } = DefaultMaxTokens;
    /// <summary>0 (the default) is greedy decoding.</summary>
    public double Temperature { get; init; }
    public double TopP { get; init; } = 1.0;
    public long? Seed { get; init; }
    /// <summary>The suite file's name and 1-based line, for messages ("capability.jsonl:12").</summary>
    public required string Where { get; init; }

    public const int DefaultMaxTokens = 64;
    public bool IsPerplexity => Text is not null;
    /// <summary>Cases whose output is generated text (not choices, labels or perplexity).</summary>
    public bool IsGenerated => Expect is not null and not ChoicesExpectation and not LabelExpectation;
}
