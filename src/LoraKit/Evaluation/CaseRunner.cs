using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Tokenization;

namespace LoraKit.Evaluation;

/// <summary>
/// Judges a rubric case's output (an LLM judge through an <c>IChatClient</c>): the verdict, and who judged it.
/// </summary>
public delegate (Verdict Verdict, string JudgedBy) RubricJudgeFunc(EvalCase @case, string output);

/// <summary>
/// Runs suites' cases on one model — the base, or the base with one loaded adapter — and checks every outcome:
/// generated cases in batches (<see cref="BatchGenerator"/>, greedy unless the case sets a temperature), choices and
/// perplexity cases by log-likelihood in batches (<see cref="ContinuationScorer"/>), label cases by a classifier when
/// one is given. Prompts are encoded once per runner and reused for every model, so base and adapters see the very
/// same ids. Cases the model cannot score are skipped with the reason (a label case without a classification
/// adapter, a rubric case without a judge).
/// </summary>
public sealed class CaseRunner
{
    readonly LoraModel _lm;
    readonly Tokenizer _tok;
    readonly IReadOnlyCollection<int> _eos;
    readonly List<(EvalSuite Suite, EvalCase Case, int[] Ids)> _cases = [];
    /// <summary>
    /// Cases this model cannot run: its chat template refuses them (e.g. a system turn), or they do not fit its context.
    /// They are skipped on every model with the reason, and counted as skipped in the report, rather than stopping an
    /// evaluation of suites written for other models (the built-in ones among them).
    /// </summary>
    readonly Dictionary<int, string> _unrunnable = [];

    /// <summary>Rows decoded together.</summary>
    public int MaxBatch { get; init; } = 32;
    /// <summary>The judge for rubric cases (null: rubric cases are skipped).</summary>
    public RubricJudgeFunc? Judge { get; init; }
    /// <summary>All cases of all suites.</summary>
    public int CaseCount => _cases.Count;

    /// <summary>
    /// Prepares the cases: renders chat cases with <paramref name="template"/>, encodes every prompt and checks it fits
    /// the model's context, all before anything runs. A chat case on a model without a template is an error naming the
    /// case's file and line; one the template refuses, or one too long for the context, is skipped with the reason.
    /// </summary>
    public CaseRunner(LoraModel lm, Tokenizer tokenizer, ChatTemplate? template, IReadOnlyCollection<int> eosTokenIds, IReadOnlyList<EvalSuite> suites)
    {
        _lm = lm; _tok = tokenizer; _eos = eosTokenIds;
        var names = new HashSet<string>();
        foreach (var suite in suites)
        {
            if (!names.Add(suite.Name)) throw new SuiteException($"{suite.Path}: two suites are named '{suite.Name}'; case names (SUITE/ID) would clash — rename one file");
            foreach (var c in suite.Cases)
            {
                try { _cases.Add((suite, c, Encode(c, template))); }
                catch (CaseSkipException e)
                {
                    _unrunnable[_cases.Count] = e.Message;
                    _cases.Add((suite, c, []));
                }
            }
        }
    }

    int[] Encode(EvalCase c, ChatTemplate? template)
    {
        int[] ids;
        if (c.Messages is not null)
        {
            if (template is null) throw new SuiteException($"{c.Where}: a chat case ('messages'), but the model has no chat template (tokenizer_config.json 'chat_template'); use 'prompt'");
            string rendered;
            try { rendered = template.Render(c.Messages, addGenerationPrompt: true, _tok.Config); }
            catch (LoraKitException e) { throw new CaseSkipException($"the chat template cannot render this case: {e.Message}"); }
            ids = _tok.Encode(rendered, addSpecialTokens: false);
        }
        else ids = _tok.Encode(c.Prompt ?? c.Text!);
        int limit = _lm.Model.Config.MaxPositionEmbeddings;
        int need = ids.Length + (c.Expect is ChoicesExpectation ch ? ch.Choices.Max(x => _tok.Encode(x, addSpecialTokens: false).Length) : c.IsGenerated ? 1 : 0);
        if (ids.Length == 0 || (c.IsPerplexity && ids.Length < 2))
            throw new SuiteException($"{c.Where}: the {(c.IsPerplexity ? "text" : "prompt")} encodes to {(ids.Length == 0 ? "no tokens" : "one token")}; nothing to score");
        if (need > limit) throw new CaseSkipException($"the case needs {need} tokens; the model's context (max_position_embeddings) is {limit}");
        return ids;
    }

    /// <summary>
    /// Every case's result on the model with adapter <paramref name="adapter"/> active (null: the base alone), in suite
    /// order. <paramref name="classify"/> labels texts when the adapter is a classification adapter (null otherwise).
    /// <paramref name="onDone"/> is called once per finished case.
    /// </summary>
    public List<CaseResult> Run(string? adapter, Func<IReadOnlyList<int[]>, IReadOnlyList<string>>? classify = null, Action? onDone = null)
    {
        bool wasTraining = _lm.Model.training;
        _lm.Model.eval(); // no dropout, whatever the caller (a trainer) left
        _lm.SetRowAdapters(null);
        _lm.SetDisabled(adapter is null);
        if (adapter is not null) _lm.SetActive(adapter);
        try
        {
            var results = new CaseResult?[_cases.Count];
            foreach (var (i, why) in _unrunnable) results[i] = Skip(i, why);
            if (classify is not null) RunLabels(results, classify, onDone);
            else RunGenerated(results, onDone);
            RunScored(results, skipAll: classify is not null, onDone);
            for (int i = 0; i < results.Length; i++)
            {
                if (results[i] is not null && !_unrunnable.ContainsKey(i)) continue;
                results[i] ??= Skip(i, classify is not null ? "a classification adapter is only scored on label cases" : "a label case needs a classification adapter");
                onDone?.Invoke(); // skipped cases count as done too, so the progress bar reaches its total
            }
            return results.Select(r => r!).ToList();
        }
        finally { _lm.Model.train(wasTraining); }
    }

    CaseResult Skip(int i, string reason) => Result(i, CaseStatus.Skipped, null, reason);

    CaseResult Result(int i, CaseStatus status, string? output, string? reason, LogLikelihood? ll = null, string? judgedBy = null, int? generated = null)
    {
        var (s, c, _) = _cases[i];
        return new CaseResult(s.Name, c.Id, c.Kind, status, output, reason, ll?.Sum, ll?.Tokens, judgedBy, generated);
    }

    void RunGenerated(CaseResult?[] results, Action? onDone)
    {
        var idx = Enumerable.Range(0, _cases.Count).Where(i => _cases[i].Case.IsGenerated && !_unrunnable.ContainsKey(i)).ToList();
        var rows = idx.Select(i => (_cases[i].Ids, Options(_cases[i].Case))).ToList();
        var outputs = BatchGenerator.Generate(_lm.Model, _tok, rows, MaxBatch, onDone: onDone);
        for (int k = 0; k < idx.Count; k++)
        {
            int i = idx[k];
            var c = _cases[i].Case;
            string text = outputs[k].Text;
            int n = outputs[k].OutputIds.Length;
            if (c.Expect is RubricExpectation)
            {
                if (Judge is null) { results[i] = Result(i, CaseStatus.Skipped, text, "a rubric case needs a judge (--judge-url)", generated: n); continue; }
                var (v, by) = Judge(c, text);
                results[i] = Result(i, v.Passed ? CaseStatus.Passed : CaseStatus.Failed, text, v.Reason, judgedBy: by, generated: n);
                continue;
            }
            var verdict = c.Expect!.Check(text);
            results[i] = Result(i, verdict.Passed ? CaseStatus.Passed : CaseStatus.Failed, text, verdict.Reason, generated: n);
        }
    }

    SamplingOptions Options(EvalCase c) => new()
    {
        MaxNewTokens = c.MaxTokens, Temperature = c.Temperature, TopP = c.TopP,
        Seed = c.Seed ?? 0, // sampled cases are reproducible, and base and adapters draw from the same stream
        EosTokenIds = _eos,
    };

    /// <summary>Choices (summed log-likelihood of each choice after the prompt) and perplexity cases (NLL of the text).</summary>
    void RunScored(CaseResult?[] results, bool skipAll, Action? onDone)
    {
        var rows = new List<(int[] Context, int[] Continuation)>();
        var owners = new List<(int Case, int Choice)>();
        for (int i = 0; i < _cases.Count; i++)
        {
            var (_, c, ids) = _cases[i];
            if (_unrunnable.ContainsKey(i)) continue;
            if (skipAll && (c.IsPerplexity || c.Expect is ChoicesExpectation)) continue;
            if (c.IsPerplexity) { rows.Add((ids[..1], ids[1..])); owners.Add((i, -1)); }
            else if (c.Expect is ChoicesExpectation ch)
                for (int j = 0; j < ch.Choices.Count; j++) { rows.Add((ids, _tok.Encode(ch.Choices[j], addSpecialTokens: false))); owners.Add((i, j)); }
        }
        if (rows.Count == 0) return;
        var scores = ContinuationScorer.Score(_lm.Model, rows);
        foreach (var group in owners.Select((o, k) => (o, k)).GroupBy(x => x.o.Case))
        {
            int i = group.Key;
            var c = _cases[i].Case;
            if (c.IsPerplexity)
            {
                var ll = scores[group.Single().k];
                results[i] = Result(i, CaseStatus.Scored, null, null, ll);
            }
            else
            {
                var best = group.MaxBy(x => scores[x.k].Sum);
                string picked = best.o.Choice.ToString(System.Globalization.CultureInfo.InvariantCulture);
                var verdict = c.Expect!.Check(picked);
                results[i] = Result(i, verdict.Passed ? CaseStatus.Passed : CaseStatus.Failed, ((ChoicesExpectation)c.Expect).Choices[best.o.Choice], verdict.Reason);
            }
            onDone?.Invoke();
        }
    }

    void RunLabels(CaseResult?[] results, Func<IReadOnlyList<int[]>, IReadOnlyList<string>> classify, Action? onDone)
    {
        var idx = Enumerable.Range(0, _cases.Count).Where(i => _cases[i].Case.Expect is LabelExpectation && !_unrunnable.ContainsKey(i)).ToList();
        if (idx.Count == 0) return;
        var labels = classify(idx.Select(i => _cases[i].Ids).ToList());
        for (int k = 0; k < idx.Count; k++)
        {
            var verdict = _cases[idx[k]].Case.Expect!.Check(labels[k]);
            results[idx[k]] = Result(idx[k], verdict.Passed ? CaseStatus.Passed : CaseStatus.Failed, labels[k], verdict.Reason);
            onDone?.Invoke();
        }
    }
}

/// <summary>A case this model cannot run; the runner skips it rather than stopping the evaluation.</summary>
internal sealed class CaseSkipException(string message) : LoraKitException(message);
