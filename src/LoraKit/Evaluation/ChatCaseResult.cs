using Microsoft.Extensions.AI.Evaluation;

namespace LoraKit.Evaluation;

/// <summary>
/// One case of a suite evaluated through a chat client: its outcome, the model's output (null when none was generated),
/// the reason (why it failed, was not applicable or errored; a judged pass says <c>judged by X</c>) and the
/// Microsoft.Extensions.AI.Evaluation result (null when the case was not sent to the model — choices, label, perplexity —
/// or the model call failed).
/// </summary>
public sealed record ChatCaseResult(EvalCase Case, CaseOutcome Outcome, string? Output, string? Reason, EvaluationResult? Evaluation);
