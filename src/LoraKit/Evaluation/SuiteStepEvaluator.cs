using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;

namespace LoraKit.Evaluation;

/// <summary>
/// <c>train --eval-suite</c>: runs the suites on the model being trained at step 0 and at every evaluation (the
/// <see cref="IStepEvaluator"/> contract) and reports <c>suite:task</c>, <c>suite:capability</c>, <c>suite:safety</c>
/// (pass rates) and <c>suite:perplexity</c>, each only when the suites have cases of that kind with a verdict. Prompts
/// are rendered and encoded once, on the first call, so every evaluation scores the very same ids.
/// </summary>
public sealed class SuiteStepEvaluator(IReadOnlyList<EvalSuite> suites, Tokenizer tokenizer, ChatTemplate? template, IReadOnlyCollection<int> eosTokenIds,
    int maxBatch = 32) : IStepEvaluator
{
    CaseRunner? _runner;

    /// <summary>Loads the suites and the tokenizer, chat template and EOS ids of the model in <paramref name="modelDir"/>; suite errors come now, before training.</summary>
    public static SuiteStepEvaluator ForModel(string modelDir, IEnumerable<string> suitePaths)
    {
        var suites = suitePaths.Select(EvalSuite.Load).ToList();
        var tok = Tokenizer.Load(modelDir);
        var template = ChatTemplate.Of(tok);
        return new SuiteStepEvaluator(suites, tok, template, StopTokens.EosTokenIds(ModelConfig.Load(modelDir), tok, modelDir));
    }

    /// <inheritdoc/>
    public IReadOnlyDictionary<string, double> Evaluate(LoraModel model, string? adapterName, int step)
    {
        _runner ??= new CaseRunner(model, tokenizer, template, eosTokenIds, suites) { MaxBatch = maxBatch };
        var scores = Scores.Of(_runner.Run(adapterName));
        var metrics = new Dictionary<string, double>();
        foreach (var kind in Enum.GetValues<CaseKind>())
            if (scores.Rate(kind) is double rate) metrics[$"suite:{Scores.Name(kind)}"] = rate;
        if (scores.Perplexity is double ppl) metrics["suite:perplexity"] = ppl;
        return metrics;
    }
}
