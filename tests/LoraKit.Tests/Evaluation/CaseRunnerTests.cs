using System.Text.Json;
using LoraKit.Classification;
using LoraKit.Evaluation;
using static TorchSharp.torch;

namespace LoraKit.Tests.Evaluation;

/// <summary>The runner's wiring: what each kind of case is scored by, what is skipped and why, and the errors it names by file:line.</summary>
[Collection(GlobalRng.Name)]
public class CaseRunnerTests
{
    static EvalSuite Suite(string name, params object[] cases)
    {
        var path = Path.Combine(Fixtures.TempDir(), name + ".jsonl");
        File.WriteAllLines(path, cases.Select(c => JsonSerializer.Serialize(c)));
        return EvalSuite.Load(path);
    }

    [Fact]
    public void ChoicesPickTheContinuationTheModelFindsMostLikely()
    {
        using var model = LoraKitModel.FromPretrained(Fixtures.Model("llama"), "cpu", "fp32");
        string prompt = "The colour of the sky is";
        string[] choices = [" blue", " green", " a very long answer about the weather", " red"];
        // Independent: the summed log-probability from the model's loss, as in BatchScoringTests.
        double SumLogP(string text)
        {
            var ids = model.Tokenizer.Encode(text);
            return -(ids.Length - 1) * model.Loss(text);
        }
        int best = Enumerable.Range(0, choices.Length).MaxBy(j => SumLogP(prompt + choices[j]) - SumLogP(prompt));
        var suite = Suite("choices", Enumerable.Range(0, choices.Length).Select(a => (object)new { id = $"c{a}", kind = "capability", prompt, expect = new { choices, answer = a } }).ToArray());
        var report = model.Evaluate([suite]);
        Assert.Equal(Enumerable.Range(0, choices.Length).Select(a => a == best ? CaseStatus.Passed : CaseStatus.Failed), report.BaseResults.Select(r => r.Status));
        Assert.All(report.BaseResults, r => Assert.Equal(choices[best], r.Output));
    }

    [Fact]
    public void LabelCasesAreScoredByAClassificationAdapterAndSkippedElsewhere()
    {
        var (adapter, _) = TinyClassifiers.Get("qwen2");
        var texts = TinyClassifiers.All.Take(6).ToList();
        var suite = Suite("labels", texts.Select((t, i) => (object)new { id = $"l{i}", kind = "task", prompt = t.text, expect = new { label = t.label } })
            .Append(new { id = "gen", kind = "task", prompt = "hello", expect = new { contains = "x" }, max_tokens = 2 }).ToArray());
        List<Prediction> expected;
        using (var clf = TextClassifier.Load(Fixtures.Model("qwen2"), adapter, ScalarType.Float32, CPU)) expected = clf.Classify(texts.Select(t => t.text).ToList());
        using var model = LoraKitModel.FromPretrained(Fixtures.Model("qwen2"), "cpu", "fp32");
        var report = model.Evaluate([suite], [adapter]);
        var a = report.Adapters[0].Results;
        for (int i = 0; i < texts.Count; i++)
        {
            Assert.Equal(expected[i].Label, a[i].Output);
            Assert.Equal(expected[i].Label == texts[i].label ? CaseStatus.Passed : CaseStatus.Failed, a[i].Status);
            Assert.Equal(CaseStatus.Skipped, report.BaseResults[i].Status);
            Assert.Contains("classification adapter", report.BaseResults[i].Reason);
        }
        Assert.Equal(CaseStatus.Skipped, a[^1].Status);
        Assert.NotEqual(CaseStatus.Skipped, report.BaseResults[^1].Status);
    }

    [Fact]
    public void BuiltinSuitesRunAndTemplateRefusalsAreSkippedNotFatal()
    {
        // Mistral's template refuses turns that do not alternate: such a case is skipped with the template's words, as are
        // cases longer than the fixture's 256-token context; the rest run.
        using var model = LoraKitModel.FromPretrained(Fixtures.Model("mistral"), "cpu", "fp32");
        var odd = Suite("odd", new { id = "two-users", kind = "capability", messages = new[] { new { role = "user", content = "hi" }, new { role = "user", content = "again" } }, expect = new { equals = "x" } });
        var report = model.Evaluate([EvalSuite.Load("lorakit:capability"), EvalSuite.Load("lorakit:safety"), odd], options: new EvalOptions { MaxBatch = 64 });
        var skipped = report.BaseResults.Where(r => r.Status == CaseStatus.Skipped).ToList();
        Assert.Contains("chat template cannot render", skipped.Single(r => r.Id == "two-users").Reason);
        Assert.Contains("must alternate", skipped.Single(r => r.Id == "two-users").Reason);
        Assert.All(skipped.Where(r => r.Id != "two-users"), r => Assert.Contains("max_position_embeddings", r.Reason));
        Assert.True(report.BaseResults.Count(r => r.HasVerdict) > 40);
        Assert.NotNull(report.BaseScores.Perplexity);
    }

    [Fact]
    public void CasesTooLongAreSkippedAndChatWithoutATemplateIsRefusedNamingFileAndLine()
    {
        using var model = LoraKitModel.FromPretrained(Fixtures.Model("llama"), "cpu", "fp32");
        int context = model.Model.Config.MaxPositionEmbeddings;
        var tooLong = Suite("long", new { id = "ok", kind = "task", prompt = "hi", expect = new { equals = "x" } },
            new { id = "big", kind = "task", prompt = string.Join(" ", Enumerable.Repeat("word", context * 2)), expect = new { equals = "x" } });
        var results = model.Evaluate([tooLong]).BaseResults;
        Assert.NotEqual(CaseStatus.Skipped, results[0].Status);
        Assert.Equal(CaseStatus.Skipped, results[1].Status);
        Assert.Contains("max_position_embeddings", results[1].Reason);

        using var phi = LoraKitModel.FromPretrained(Fixtures.Model("phi3"), "cpu", "fp32"); // no chat template
        var chat = Suite("chat", new { id = "c", kind = "task", messages = new[] { new { role = "user", content = "hi" } }, expect = new { equals = "x" } });
        var e = Assert.Throws<SuiteException>(() => phi.Evaluate([chat]));
        Assert.StartsWith("chat.jsonl:1:", e.Message);
        Assert.Contains("no chat template", e.Message);
    }
}
