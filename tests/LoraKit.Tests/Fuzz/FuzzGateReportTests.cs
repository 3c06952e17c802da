using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Evaluation;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// A gate report (eval.json) is untrusted input to <c>lorakit merge --gate-report</c> and to promotion (issue 18): a real
/// report from <see cref="EvalReport.ToJson"/> is mutated field by field (every path × wrong types and values), and odd
/// files stand in for it (a directory, a pipe, links, devices). <see cref="GateCheck.Require"/> must either refuse with
/// one clean <see cref="LoraKitException"/> line (the fuzz contract), or accept — and it may accept only a report whose
/// format is right, whose base fingerprint is this base's, and in which every entry for this adapter's hash has a gate
/// whose "passed" is the JSON boolean true.
/// </summary>
public class FuzzGateReportTests
{
    const string Sha = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
    const string OtherSha = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
    const string Fingerprint = "f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0";

    /// <summary>A real report through the real writer: one adapter that passes (<see cref="Sha"/>), one that fails.</summary>
    static JsonObject RealReport()
    {
        var suite = SuiteReader.Parse(Encoding.UTF8.GetBytes(
            """{"id": "c1", "kind": "capability", "prompt": "p", "expect": {"equals": "x"}}""" + "\n" +
            """{"id": "s1", "kind": "safety", "prompt": "p", "expect": {"not_contains": ["y"]}}""" + "\n"), "s.jsonl", "s.jsonl");
        List<CaseResult> Results(CaseStatus cap, CaseStatus safe) =>
            [new("s", "c1", CaseKind.Capability, cap, "x"), new("s", "s1", CaseKind.Safety, safe, "</pre><script>alert(1)</script>")];
        var baseResults = Results(CaseStatus.Passed, CaseStatus.Passed);
        AdapterEval Eval(string sha, List<CaseResult> results)
        {
            var c = Comparison.Of(baseResults, results);
            return new AdapterEval("adapter-" + sha[..2], sha, results, c, GateResult.Decide(c, new GateThresholds()));
        }
        var report = new EvalReport
        {
            Model = "m", BaseFingerprint = Fingerprint, Suites = [suite], BaseResults = baseResults, Thresholds = new GateThresholds(),
            Adapters = [Eval(Sha, Results(CaseStatus.Passed, CaseStatus.Passed)), Eval(OtherSha, Results(CaseStatus.Passed, CaseStatus.Failed))],
        };
        Assert.True(report.Adapters[0].Gate.Passed);
        Assert.False(report.Adapters[1].Gate.Passed);
        return report.ToJson();
    }

    /// <summary>What an accepted report must really hold (read independently of GateCheck).</summary>
    static string? WhyNotAcceptable(JsonNode? root, string sha)
    {
        if (root is not JsonObject o) return "root is not an object";
        if (o["format"] is not JsonValue f || f.GetValueKind() != JsonValueKind.String || f.GetValue<string>() != EvalReport.Format) return "format";
        if (o["base"]?["fingerprint"] is not JsonValue fp || fp.GetValueKind() != JsonValueKind.String || fp.GetValue<string>() != Fingerprint) return "fingerprint";
        if (o["adapters"] is not JsonArray adapters) return "no adapters array";
        var mine = adapters.OfType<JsonObject>().Where(a => a["sha256"] is JsonValue s && s.GetValueKind() == JsonValueKind.String && s.GetValue<string>() == sha).ToList();
        if (mine.Count == 0) return "no entry for the adapter";
        if (mine.Any(a => a["gate"]?["passed"] is not JsonValue p || p.GetValueKind() != JsonValueKind.True)) return "an entry's gate.passed is not true";
        return null;
    }

    /// <summary>The contract for one report file: a clean refusal, or an acceptance of a report that deserves it.</summary>
    static void Check(string caseName, string path, string sha = Sha)
    {
        GateCheck.Evidence? evidence = null;
        var e = FuzzContract.Check("gate-report", caseName, () => evidence = GateCheck.Require(path, sha, Fingerprint));
        if (e is not null)
        {
            Assert.True(e is LoraKitException, $"[gate-report] {caseName}: {e.GetType().Name}: {e.Message}");
            return;
        }
        JsonNode? root = null;
        try { root = JsonNode.Parse(File.ReadAllBytes(Directory.Exists(path) ? Path.Combine(path, EvalReport.JsonFile) : path)); }
        catch (JsonException) { }
        Assert.True(WhyNotAcceptable(root, sha) is null, $"[gate-report] {caseName}: accepted, but {WhyNotAcceptable(root, sha)}");
    }

    static string Write(string dir, string name, string text)
    {
        var path = Path.Combine(dir, name);
        File.WriteAllText(path, text);
        return path;
    }

    static IEnumerable<List<object>> Paths(JsonNode? n, List<object> prefix)
    {
        yield return prefix;
        if (n is JsonObject o) foreach (var (k, v) in o) foreach (var p in Paths(v, [.. prefix, k])) yield return p;
        if (n is JsonArray a) for (int i = 0; i < a.Count; i++) foreach (var p in Paths(a[i], [.. prefix, i])) yield return p;
    }

    static void Set(JsonNode root, List<object> path, JsonNode? value, bool remove)
    {
        var parent = root;
        foreach (var step in path[..^1]) parent = step is string k ? parent[k]! : parent[(int)step]!;
        if (path[^1] is string key)
        {
            if (remove) parent.AsObject().Remove(key);
            else parent[key] = value;
        }
        else if (remove) parent.AsArray().RemoveAt((int)path[^1]);
        else parent[(int)path[^1]] = value;
    }

    static readonly (string name, JsonNode? value)[] Values =
    [
        ("null", null), ("string", "x"), ("empty string", ""), ("string true", "true"), ("true", true), ("false", false), ("0", 0), ("1", 1),
        ("-1", -1), ("1e300", 1e300), ("array", new JsonArray(1, "a")), ("empty array", new JsonArray()), ("object", new JsonObject { ["passed"] = true }),
        ("the sha", Sha), ("the fingerprint", Fingerprint), ("newlines", "line one\nline two\r\n\u0000"), ("long", new string('r', 200_000)),
    ];

    [Fact]
    public void EveryFieldMutatedIsRefusedCleanlyOrIsStillAPassedGateForThisAdapter()
    {
        var dir = Fixtures.TempDir();
        var real = RealReport();
        // Keep the mutation count bounded: the "cases" tree repeats the same shapes, one case is enough of it.
        var paths = Paths(real, []).Where(p => p.Count > 0 && !(p[0] is "cases" && p.Count > 1 && p[1] is int i && i > 0)).ToList();
        Check("real report", Write(dir, "real.json", real.ToJsonString()));
        var evidence = GateCheck.Require(Path.Combine(dir, "real.json"), Sha, Fingerprint);
        Assert.Equal(2, evidence.Thresholds!["max_capability_drop"]!.GetValue<double>()); // merge records what the gate was decided with
        int n = 0;
        foreach (var path in paths)
        {
            string where = string.Join(".", path);
            foreach (var (name, value) in Values.Prepend(("removed", null)))
            {
                var mutated = real.DeepClone();
                Set(mutated, path, value?.DeepClone(), remove: name == "removed");
                Check($"{where} = {name}", Write(dir, $"m{n++}.json", mutated.ToJsonString()));
            }
        }
        // The failing adapter's report: never accepted for it, whatever is mutated outside its gate.
        Assert.Throws<GateException>(() => GateCheck.Require(Write(dir, "real2.json", real.ToJsonString()), OtherSha, Fingerprint));
    }

    [Fact]
    public void DuplicateEntriesForOneAdapterMustAllPass()
    {
        var dir = Fixtures.TempDir();
        var real = RealReport();
        var adapters = real["adapters"]!.AsArray();
        var failed = adapters[0]!.DeepClone();
        failed["gate"] = new JsonObject { ["passed"] = false, ["reasons"] = new JsonArray("capability drops") };
        foreach (var (name, order) in new[] { ("passed first", new[] { adapters[0]!.DeepClone(), failed.DeepClone() }), ("failed first", new[] { failed.DeepClone(), adapters[0]!.DeepClone() }) })
        {
            var r = real.DeepClone();
            r["adapters"] = new JsonArray(order);
            var e = Assert.Throws<GateException>(() => GateCheck.Require(Write(dir, name + ".json", r.ToJsonString()), Sha, Fingerprint));
            Assert.Contains("capability drops", e.Message);
        }
        // Duplicate keys in one object ("passed": false, "passed": true) are not JSON LoraKit accepts.
        var text = real.ToJsonString().Replace("\"passed\":true", "\"passed\":false,\"passed\":true");
        var dup = Assert.ThrowsAny<LoraKitException>(() => GateCheck.Require(Write(dir, "dup-key.json", text), Sha, Fingerprint));
        Assert.Null(FuzzContract.JudgeMessage(dup.Message));
    }

    [Fact]
    public void ReasonsQuotedFromAReportStayOneShortLine()
    {
        var dir = Fixtures.TempDir();
        var r = RealReport();
        r["adapters"]![0]!["gate"] = new JsonObject { ["passed"] = false, ["reasons"] = new JsonArray("a\nb\r\nc", new string('x', 100_000)) };
        var e = Assert.Throws<GateException>(() => GateCheck.Require(Write(dir, "r.json", r.ToJsonString()), Sha, Fingerprint));
        Assert.Null(FuzzContract.JudgeMessage(e.Message));
        Assert.Contains("a b  c", e.Message);
    }

    [Fact]
    public void OddFilesInTheReportsPlaceAreRefusedInBoundedTime()
    {
        var dir = Fixtures.TempDir();
        var real = Write(dir, "eval.json", RealReport().ToJsonString());
        Check("the report's directory", dir);                                   // a directory means DIR/eval.json: accepted
        Check("empty directory", Directory.CreateDirectory(Path.Combine(dir, "empty")).FullName);
        var link = Path.Combine(dir, "link.json");
        File.CreateSymbolicLink(link, real);
        Check("link to the report", link);
        var dangling = Path.Combine(dir, "dangling.json");
        File.CreateSymbolicLink(dangling, Path.Combine(dir, "nothing"));
        Check("dangling link", dangling);
        var loop = Path.Combine(dir, "loop.json");
        File.CreateSymbolicLink(loop, loop);
        Check("link loop", loop);
        Check("/dev/zero", "/dev/zero");
        Check("/dev/null", "/dev/null");
        Check("empty file", Write(dir, "empty.json", ""));
        Check("binary", Write(dir, "bin.json", "\u0000\u00ff{"));
        Check("deep", Write(dir, "deep.json", new string('[', 100_000)));
        var fifo = Path.Combine(dir, "fifo.json");
        using (var p = Process.Start("mkfifo", [fifo])) p.WaitForExit();
        var watch = Stopwatch.StartNew();
        var e = Assert.ThrowsAny<LoraKitException>(() => GateCheck.Require(fifo, Sha, Fingerprint));
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(30), $"a pipe took {watch.Elapsed}");
        Assert.Null(FuzzContract.JudgeMessage(e.Message));
    }

    [Fact]
    public void AnAdapterWhoseFilesArePipesOrDevicesIsRefusedOrHashedInBoundedTime()
    {
        var adapter = Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", "a"));
        string weights = Path.Combine(adapter, Lora.AdapterFiles.WeightsFile);
        File.Delete(weights);
        File.CreateSymbolicLink(weights, "/dev/zero");
        var e = FuzzContract.Check("adapter-digest", "/dev/zero weights", () => Lora.AdapterDigest.Compute(adapter));
        Assert.Null(FuzzContract.Judge(e));
        File.Delete(weights);
        using (var p = Process.Start("mkfifo", [weights])) p.WaitForExit();
        var watch = Stopwatch.StartNew();
        var fifo = Assert.ThrowsAny<LoraKitException>(() => Lora.AdapterDigest.Compute(adapter));
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(30), $"a pipe took {watch.Elapsed}");
        Assert.Contains(Lora.AdapterFiles.WeightsFile, fifo.Message);
    }
}
