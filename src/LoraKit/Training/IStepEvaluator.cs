using LoraKit.Lora;

namespace LoraKit.Training;

/// <summary>
/// Measures the model under training on something other than its validation loss (evaluation suites: task, capability
/// and safety cases). Training defines this and the evaluation layer implements it, so the trainer never depends on
/// how the measuring is done (<c>eval_suite</c> in <see cref="TrainConfig"/> names the suites; the CLI builds the
/// evaluator from them).
/// <para>
/// The call contract, as <see cref="Trainer.Run"/> keeps it:
/// <list type="bullet">
/// <item>It is called once before the first optimizer step with <c>step</c> 0 (the model before training: the base
/// model, since a fresh adapter's B is zero; the starting adapter with <c>init_adapter</c>), and again at every
/// evaluation (every <c>eval_every</c> steps and at the last step) with that step. A resumed run does not call it
/// for step 0 again: that record is already in metrics.jsonl.</item>
/// <item>The model is in eval mode (no dropout) under <c>torch.no_grad()</c> and a dispose scope of the trainer's:
/// every tensor made during the call is freed when it returns, so an evaluator keeps none across calls (or takes it
/// out of the scope with <c>DetachFromDisposeScope</c>);
/// the adapter being trained, <c>adapterName</c> (null when every weight is trained, <c>method</c> full),
/// is the active, enabled one. The evaluator may switch adapters (to score the base beside it, say) but must leave
/// that adapter active and enabled and every weight unchanged; the trainer puts the model back in train mode after.</item>
/// <item>It returns named metrics, every name starting with <c>suite:</c>: <c>suite:task</c>,
/// <c>suite:capability</c>, <c>suite:safety</c> (pass rates in [0, 1], higher is better) and
/// <c>suite:perplexity</c> (lower is better); a kind the suites have no cases of is left out. The same names at
/// every call. A non-finite value is logged as null and never counts as the best.</item>
/// <item>An exception stops the run, as a failed training step does (checkpoints already written stay).</item>
/// </list>
/// </para>
/// </summary>
public interface IStepEvaluator
{
    /// <summary>The metrics of <paramref name="model"/> with adapter <paramref name="adapterName"/> at optimizer step <paramref name="step"/> (0: before training).</summary>
    IReadOnlyDictionary<string, double> Evaluate(LoraModel model, string? adapterName, int step);
}
