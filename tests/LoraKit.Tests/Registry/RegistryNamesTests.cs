using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Tests.Registry;

/// <summary>
/// Registered adapters by name where commands take --adapter: the name resolves to a verified checkout of that version,
/// so a command given NAME@VERSION computes exactly what it computes given the adapter's directory.
/// </summary>
public class RegistryNamesTests
{
    [Fact]
    public void ScoreEvalAndMergeTakeRegisteredNames()
    {
        var reg = Path.Combine(Fixtures.TempDir(), "registry");
        var a = Fixtures.Path_("adapters", "llama", "a");
        var (code, _, stderr) = CliTests.RunCli("registry", "add", "helpdesk", a, "--registry", reg);
        Assert.True(code == 0, stderr);
        (code, _, stderr) = CliTests.RunCli("registry", "add", "helpdesk", Fixtures.Path_("adapters", "llama", "b"), "--registry", reg);
        Assert.True(code == 0, stderr);

        string Score(params string[] extra) =>
            CliTests.RunCli(["score", "--model", Fixtures.Model("llama"), "--text", "Hello there", "--json", "--device", "cpu", .. extra]) is var r && r.code == 0
                ? JsonNode.Parse(r.stdout)!["loss"]!.ToJsonString() : throw new Xunit.Sdk.XunitException(r.stderr);
        Assert.Equal(Score("--adapter", a), Score("--adapter", "helpdesk@1", "--registry", reg));
        Assert.NotEqual(Score("--adapter", a), Score("--adapter", "helpdesk", "--registry", reg)); // no production alias: the latest, v2

        var suite = Path.Combine(Fixtures.TempDir(), "s.jsonl");
        File.WriteAllText(suite, JsonSerializer.Serialize(new { id = "t", kind = "task", prompt = "Hello", expect = new { contains = "x" }, max_tokens = 2 }) + "\n");
        (code, var stdout, stderr) = CliTests.RunCli("eval", "--model", Fixtures.Model("llama"), "--adapter", "helpdesk@1", "--registry", reg, "--suite", suite, "--json", "--device", "cpu");
        Assert.True(code == 0, stderr);
        Assert.Equal(Lora.AdapterDigest.Compute(a), JsonNode.Parse(stdout)!["adapters"]![0]!["sha256"]!.GetValue<string>());

        var merged = Path.Combine(Fixtures.TempDir(), "merged");
        (code, _, stderr) = CliTests.RunCli("merge", "--model", Fixtures.Model("llama"), "--adapter", "helpdesk@1", "--registry", reg, "--no-gate", "--output", merged);
        Assert.True(code == 0, stderr);
        Assert.Equal(Lora.AdapterDigest.Compute(a), JsonNode.Parse(File.ReadAllText(Path.Combine(merged, "config.json")))!["lorakit_merge"]!["adapter_sha256"]!.GetValue<string>());

        // Unknown names and missing registries are one clear line; a registry is never created by a lookup.
        (code, _, stderr) = CliTests.RunCli("score", "--model", Fixtures.Model("llama"), "--text", "x", "--adapter", "nosuch@1", "--registry", reg);
        Assert.Equal(1, code);
        Assert.Contains("nosuch", stderr);
        var none = Path.Combine(Fixtures.TempDir(), "no-registry");
        (code, _, stderr) = CliTests.RunCli("score", "--model", Fixtures.Model("llama"), "--text", "x", "--adapter", "helpdesk@1", "--registry", none);
        Assert.Equal(1, code);
        Assert.Contains("no registry at", stderr);
        Assert.False(Directory.Exists(none));
    }
}
