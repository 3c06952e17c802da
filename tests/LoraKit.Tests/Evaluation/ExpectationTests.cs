using System.Diagnostics;
using System.Text.RegularExpressions;
using LoraKit.Evaluation;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// Every expectation's check: it passes what it should, fails what it should, and a failure says why in plain words.
/// Each expectation is built by parsing a suite line (as the runner gets it), so the parser's mapping is covered too.
/// </summary>
public class ExpectationTests
{
    /// <summary>The expectation a suite line with this <c>expect</c> object yields.</summary>
    internal static Expectation Expect(string expectJson)
    {
        var line = $$"""{"id": "x", "kind": "task", "prompt": "p", "expect": {{expectJson}}}""";
        return SuiteReader.Parse(System.Text.Encoding.UTF8.GetBytes(line), "t.jsonl", "t.jsonl").Cases[0].Expect!;
    }

    static void Passes(Expectation e, string output) => Assert.True(e.Check(output).Passed, $"{e.Describe()} should pass {output}");

    static void Fails(Expectation e, string output, string reasonFragment)
    {
        var v = e.Check(output);
        Assert.False(v.Passed, $"{e.Describe()} should fail {output}");
        Assert.Contains(reasonFragment, v.Reason);
    }

    [Fact]
    public void EqualsComparesTrimmedTextExactly()
    {
        var e = Expect("""{"equals": "42"}""");
        Assert.IsType<EqualsExpectation>(e);
        Passes(e, "42");
        Passes(e, "  42\n");
        Fails(e, "43", "expected \"42\"");
        Fails(e, "42.", "expected \"42\"");
        Fails(Expect("""{"equals": "HELLO"}"""), "hello", "expected \"HELLO\"");
        Assert.Contains("42", e.Describe());
    }

    [Fact]
    public void ContainsNeedsEveryString()
    {
        var one = Expect("""{"contains": "Paris"}""");
        Passes(one, "The capital is Paris.");
        Fails(one, "The capital is paris.", "missing \"Paris\"");
        var all = Expect("""{"contains": ["def add(", "return"]}""");
        Assert.Equal(["def add(", "return"], ((ContainsExpectation)all).Values);
        Passes(all, "def add(a, b):\n    return a + b");
        var v = all.Check("def add(a, b): pass");
        Assert.False(v.Passed);
        Assert.Contains("\"return\"", v.Reason);
        Assert.DoesNotContain("def add(", v.Reason);
    }

    [Fact]
    public void NotContainsRefusesAnyStringIgnoringCase()
    {
        var e = Expect("""{"not_contains": ["ORCHID-7731", "secret"]}""");
        Passes(e, "I can't share that.");
        Fails(e, "The password is orchid-7731.", "contains \"ORCHID-7731\"");
        Fails(e, "It is a SECRET.", "\"secret\"");
        Assert.Contains("none of", e.Describe());
    }

    [Fact]
    public void RegexMatchesAnywhereAndNamesThePatternWhenNot()
    {
        var e = Expect("""{"regex": "(?i)\\bbleu\\b"}""");
        var r = Assert.IsType<RegexExpectation>(e);
        Assert.Equal(RegexExpectation.MatchTimeout, r.Regex.MatchTimeout);
        Passes(e, "Le ciel est Bleu.");
        Fails(e, "Le ciel est bleuâtre.", "no match for /(?i)\\bbleu\\b/");
    }

    [Theory]
    [InlineData("(a+)+$")]
    [InlineData("(a|aa)+$")]
    [InlineData("^(\\w+\\s?)*$")]
    [InlineData("(.*a){25}x")]
    public void CatastrophicRegexFailsInBoundedTime(string pattern)
    {
        var e = Expect($$"""{"regex": {{System.Text.Json.JsonSerializer.Serialize(pattern)}}}""");
        var output = new string('a', 5000) + "!";
        var sw = Stopwatch.StartNew();
        var v = e.Check(output);
        Assert.True(sw.Elapsed < RegexExpectation.MatchTimeout * 4, $"took {sw.Elapsed}");
        Assert.False(v.Passed);
        Assert.Contains(pattern, v.Reason);
    }

    [Fact]
    public void CatastrophicRegexReportsRunningOutOfTime()
    {
        var e = Expect("""{"regex": "(a+)+$"}""");
        var v = e.Check(new string('a', 20000) + "!");
        Assert.False(v.Passed);
        Assert.Contains("ran out of time", v.Reason);
    }

    [Fact]
    public void JsonAcceptsAnyJsonValueAlsoInAFence()
    {
        var e = Expect("""{"json": true}""");
        Assert.IsType<JsonExpectation>(e);
        Passes(e, """{"name": "Ada", "age": 36}""");
        Passes(e, " [1, 2, 3]\n");
        Passes(e, "```json\n{\"a\": 1}\n```");
        Passes(e, "```\n{\"a\": 1}\n```\n");
        Fails(e, "Here is the JSON: {\"a\": 1}", "not JSON");
        Fails(e, "{\"a\": 1", "not JSON");
        Fails(e, "", "not JSON");
        Fails(e, new string('[', 100) + new string(']', 100), "not JSON");
    }

    [Fact]
    public void ChoicesPassOnlyTheAnswersIndex()
    {
        var e = Expect("""{"choices": ["Venus", "Mercury", "Earth"], "answer": 1}""");
        var c = Assert.IsType<ChoicesExpectation>(e);
        Assert.Equal(1, c.Answer);
        Assert.Equal(3, c.Choices.Count);
        Passes(e, "1");
        Fails(e, "0", "picked \"Venus\", expected \"Mercury\"");
        Fails(e, "7", "picked 7, expected \"Mercury\"");
        Fails(e, "Mercury", "expected \"Mercury\"");
    }

    [Fact]
    public void LabelComparesThePredictedLabel()
    {
        var e = Expect("""{"label": "billing"}""");
        Passes(e, "billing");
        Fails(e, "support", "predicted \"support\", expected \"billing\"");
    }

    [Fact]
    public void RubricIsForAJudgeNotALocalCheck()
    {
        var e = Expect("""{"rubric": "The answer is polite and mentions the refund policy."}""");
        Assert.IsType<RubricExpectation>(e);
        Assert.Contains("refund policy", e.Describe());
        Assert.Throws<InvalidOperationException>(() => e.Check("anything"));
    }

    [Fact]
    public void ChecksNeverThrowOnOddOutputs()
    {
        var expectations = new[]
        {
            Expect("""{"equals": "x"}"""), Expect("""{"contains": ["x"]}"""), Expect("""{"not_contains": ["x"]}"""),
            Expect("""{"regex": "x+"}"""), Expect("""{"json": true}"""), Expect("""{"choices": ["a", "b"], "answer": 0}"""),
            Expect("""{"label": "x"}"""),
        };
        var r = new Random(18);
        var outputs = new List<string> { "", " ", "\uD800", "\uDC00x", "```", "```json", "\0", new string('{', 10000), "-1", "99999999999" };
        for (int i = 0; i < 50; i++) outputs.Add(new string(Enumerable.Range(0, r.Next(200)).Select(_ => (char)r.Next(0, 0xFFFF)).ToArray()));
        foreach (var e in expectations)
            foreach (var o in outputs)
            {
                var v = e.Check(o);
                Assert.True(v.Passed || !string.IsNullOrEmpty(v.Reason), $"{e.Describe()} failed {o} without a reason");
            }
    }

    [Fact]
    public void RegexOptionsAreCultureInvariant()
    {
        var r = Assert.IsType<RegexExpectation>(Expect("""{"regex": "(?i)TITLE"}"""));
        Assert.True(r.Regex.Options.HasFlag(RegexOptions.CultureInvariant));
    }
}
