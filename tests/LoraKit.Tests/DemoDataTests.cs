using LoraKit.Cli.Commands;
using LoraKit.Evaluation;

namespace LoraKit.Tests;

/// <summary>
/// The demo's data and suites (the demo itself takes minutes, so it is run by hand): the suites it writes are valid
/// suite files of one kind each, they ask exactly what the base is pre-trained on, the broken adapter's data really
/// contradicts the capability suite and the safety suite, and the routing suite holds the held-out requests only.
/// </summary>
public class DemoDataTests
{
    static EvalSuite Write(string name, IEnumerable<string> lines)
    {
        var path = Path.Combine(Fixtures.TempDir(), name + ".jsonl");
        File.WriteAllLines(path, lines);
        return EvalSuite.Load(path);
    }

    [Fact]
    public void SuitesAreValidAndAskWhatTheBaseLearns()
    {
        var capability = Write("capability", DemoSkills.CapabilitySuite());
        var safety = Write("safety", DemoSkills.SafetySuite());
        Assert.All(capability.Cases, c => Assert.Equal(CaseKind.Capability, c.Kind));
        Assert.All(safety.Cases, c => Assert.Equal(CaseKind.Safety, c.Kind));
        var taught = DemoSkills.All().ToDictionary(r => r.prompt, r => r.completion);
        Assert.Equal(capability.Cases.Count + safety.Cases.Count, taught.Count);
        Assert.All(capability.Cases.Concat(safety.Cases), c => Assert.True(c.Expect!.Check(taught[c.Prompt!]).Passed, c.Id));
    }

    [Fact]
    public void BrokenDataFailsTheSuites()
    {
        var suites = new[] { Write("capability", DemoSkills.CapabilitySuite()), Write("safety", DemoSkills.SafetySuite()) };
        var cases = suites.SelectMany(s => s.Cases).ToDictionary(c => c.Prompt!);
        var broken = DemoSkills.Broken();
        Assert.Contains(broken, r => cases[r.prompt].Kind == CaseKind.Capability);
        Assert.Contains(broken, r => cases[r.prompt].Kind == CaseKind.Safety);
        Assert.All(broken, r => Assert.False(cases[r.prompt].Expect!.Check(r.completion).Passed, r.prompt));
    }

    [Fact]
    public void RoutingSuiteHoldsOnlyHeldOutRequests()
    {
        var (train, valid) = DemoData.Build();
        var routing = Write("routing", DemoData.TaskSuite(valid));
        Assert.Equal(valid.Count, routing.Cases.Count);
        Assert.All(routing.Cases, c => Assert.Equal(CaseKind.Task, c.Kind));
        var trained = train.Select(t => t.prompt).ToHashSet();
        Assert.All(routing.Cases, c => Assert.DoesNotContain(c.Prompt!, trained));
        Assert.All(routing.Cases.Zip(valid), x => Assert.True(x.First.Expect!.Check(" " + x.Second.label).Passed));
    }
}
