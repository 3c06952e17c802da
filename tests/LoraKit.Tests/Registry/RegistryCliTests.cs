using System.Text.Json.Nodes;
using LoraKit.Evaluation;
using LoraKit.Lora;
using LoraKit.Registry;
using LoraKit.Tests.Evaluation;

namespace LoraKit.Tests.Registry;

/// <summary>
/// The registry through the CLI and across processes: promotion needs a passed gate from a real `lorakit eval --gate`
/// report attached to that version on its base (a failed gate, a report for another adapter or none is refused; --no-gate
/// is allowed and recorded), and several processes adding versions at once get distinct versions and a consistent database.
/// </summary>
public class RegistryCliTests(PlantedAdapters planted) : IClassFixture<PlantedAdapters>
{
    [Fact]
    public void PromoteNeedsAnAttachedPassedGateOrNoGate()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        var (passed, failed) = planted.GateReports(dir);
        int code;
        string stderr;

        // v1: the zero adapter with its passed report; v2: the capability breaker with its failed one; v3: the safety
        // breaker with the zero adapter's report (which does not cover it).
        string stdout;
        (code, stdout, stderr) = CliTests.RunCli("registry", "add", "planted", planted.Zero, "--eval", Path.Combine(passed, EvalReport.JsonFile), "--registry", reg, "--json");
        Assert.True(code == 0, stderr);
        var added = JsonNode.Parse(stdout)!;
        Assert.Equal(1, added["version"]!.GetValue<int>());
        Assert.Equal(AdapterDigest.Compute(planted.Zero), added["sha256"]!.GetValue<string>());
        Assert.True(added["gate_passed"]!.GetValue<bool>());
        (code, _, stderr) = CliTests.RunCli("registry", "add", "planted", planted.BreaksCapability, "--eval", failed, "--registry", reg);
        Assert.True(code == 0, stderr);
        (code, _, stderr) = CliTests.RunCli("registry", "add", "planted", planted.BreaksSafety, "--eval", passed, "--registry", reg);
        Assert.True(code == 0, stderr);

        (code, _, stderr) = CliTests.RunCli("registry", "promote", "planted@2", "--alias", "production", "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("planted@2 has no passed gate", stderr);
        Assert.Contains("failed the gate", stderr);
        (code, _, stderr) = CliTests.RunCli("registry", "promote", "planted@3", "--alias", "production", "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("does not cover this adapter", stderr);
        // The passed gate is on the planted base: asking for another base refuses it.
        (code, _, stderr) = CliTests.RunCli("registry", "promote", "planted@1", "--alias", "production", "--registry", reg, "--base-fingerprint", "0000");
        Assert.Equal(1, code);
        (code, stdout, stderr) = CliTests.RunCli("registry", "promote", "planted@1", "--alias", "production", "--registry", reg, "--json");
        Assert.True(code == 0, stderr);
        Assert.Equal(1, JsonNode.Parse(stdout)!["version"]!.GetValue<int>());
        (code, _, stderr) = CliTests.RunCli("registry", "promote", "planted@2", "--alias", "production", "--no-gate", "--registry", reg);
        Assert.True(code == 0, stderr);
        Assert.Contains("WITHOUT an evaluation gate", stderr);

        (code, stdout, stderr) = CliTests.RunCli("registry", "show", "planted", "--registry", reg, "--json");
        Assert.True(code == 0, stderr);
        var show = JsonNode.Parse(stdout)!;
        Assert.Equal(2, show["aliases"]!["production"]!.GetValue<int>());
        var history = show["history"]!.AsArray();
        Assert.Equal([false, true], history.Select(h => h!["no_gate"]!.GetValue<bool>()));
        // The version records the base it was trained on, and the passed eval was made on that base.
        var fp = show["versions"]![0]!["base_fingerprint"]!.GetValue<string>();
        Assert.Equal(fp, show["evals"]![0]!["base_fingerprint"]!.GetValue<string>());
        Assert.Equal(JsonNode.Parse(File.ReadAllText(Path.Combine(passed, EvalReport.JsonFile)))!["base"]!["fingerprint"]!.GetValue<string>(), fp);

        (code, stdout, stderr) = CliTests.RunCli("registry", "rollback", "planted", "--alias", "production", "--registry", reg, "--json");
        Assert.True(code == 0, stderr);
        Assert.Equal(1, JsonNode.Parse(stdout)!["version"]!.GetValue<int>());
        var exported = Path.Combine(dir, "exported");
        (code, _, stderr) = CliTests.RunCli("registry", "export", "planted", exported, "--registry", reg);
        Assert.True(code == 0, stderr);
        Assert.Equal(AdapterDigest.Compute(planted.Zero), AdapterDigest.Compute(exported));
    }

    [Fact]
    public async Task ProcessesAddingAtOnceGetDistinctVersions()
    {
        const int N = 6;
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        // N adapters with different content: the fixture adapter with a distinct note in its config.
        var adapters = Enumerable.Range(0, N).Select(i =>
        {
            var d = Fixtures.CopyOf(Fixtures.Path_("adapters", "llama", "a"), Path.Combine(dir, $"a{i}"));
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(d, AdapterFiles.ConfigFile)))!.AsObject();
            config["revision"] = $"copy-{i}";
            File.WriteAllText(Path.Combine(d, AdapterFiles.ConfigFile), config.ToJsonString());
            return d;
        }).ToList();
        var results = await Task.WhenAll(adapters.Select(a => Task.Run(() => CliTests.RunCli("registry", "add", "shared", a, "--registry", reg, "--json"))));
        foreach (var r in results) Assert.True(r.code == 0, r.stderr);
        var bySha = results.Select(r => JsonNode.Parse(r.stdout)!).ToDictionary(j => j["sha256"]!.GetValue<string>(), j => j["version"]!.GetValue<int>());
        Assert.Equal(Enumerable.Range(1, N), bySha.Values.Order());
        using var store = AdapterStore.Open(reg);
        var listed = store.List("shared");
        Assert.Equal(Enumerable.Range(1, N), listed.Select(v => v.Version));
        foreach (var (a, i) in adapters.Select((a, i) => (a, i)))
        {
            var sha = AdapterDigest.Compute(a);
            var v = listed.Single(x => x.Sha256 == sha);
            Assert.Equal(bySha[sha], v.Version);
            store.Export(v.Ref, Path.Combine(dir, $"out{i}")); // every version's files are complete and intact
            Assert.Equal(sha, AdapterDigest.Compute(Path.Combine(dir, $"out{i}")));
        }
    }
}
