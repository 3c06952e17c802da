using System.Diagnostics;
using System.Text.Json;

namespace LoraKit.Tests.Hub;

/// <summary>
/// The hub through the CLI, as a user runs it: <c>lorakit download</c> prints the snapshot folder, and <c>--model</c> /
/// <c>--adapter</c> take hub ids (configured by HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE) and generate what the local
/// folders generate.
/// </summary>
public sealed class HubCliTests : IDisposable
{
    readonly HubTestServer _server = new();
    readonly string _cache = Fixtures.TempDir();

    public void Dispose()
    {
        _server.Dispose();
        try { Directory.Delete(_cache, recursive: true); } catch (IOException) { }
    }

    (int code, string stdout, string stderr) Run(bool offline, params string[] args) =>
        RunCli(new() { ["HF_ENDPOINT"] = _server.Endpoint, ["HF_HUB_CACHE"] = _cache, ["HF_HUB_OFFLINE"] = offline ? "1" : "0", ["HF_TOKEN"] = null }, args);

    /// <summary>The CLI in a child process with <paramref name="env"/> set (a null value unsets the variable).</summary>
    public static (int code, string stdout, string stderr) RunCli(Dictionary<string, string?> env, params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "LoraKit.Cli.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env) if (v is null) psi.Environment.Remove(k); else psi.Environment[k] = v;
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(120_000)) { p.Kill(true); throw new TimeoutException("CLI did not finish"); }
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    static string OutputIds(string stdout)
    {
        using var doc = JsonDocument.Parse(stdout);
        return doc.RootElement.GetProperty("output_ids").GetRawText();
    }

    [Fact]
    public void DownloadPrintsTheSnapshotAndHubIdsGenerateAsLocalFolders()
    {
        string commit = _server.AddRepo("org/llama", Fixtures.Model("llama"));
        string adapter = Path.Combine(Fixtures.Root, "fixtures", "adapters", "llama", "a");
        _server.AddRepo("org/llama-lora", adapter);

        var (code, stdout, stderr) = Run(false, "download", "org/llama");
        Assert.True(code == 0, stderr);
        Assert.Equal(Path.Combine(_cache, "models--org--llama", "snapshots", commit), stdout.Trim());
        Assert.Contains("org/llama: model.safetensors", stderr);

        string[] generate = ["generate", "--prompt", "The quick brown fox", "--max-new-tokens", "8", "--temperature", "0", "--json", "--device", "cpu"];
        var hub = Run(true, [.. generate, "--model", "org/llama", "--adapter", "org/llama-lora"]); // offline: the adapter is not cached
        Assert.Equal(1, hub.code);
        Assert.Contains("org/llama-lora: not in the hub cache", hub.stderr);
        Assert.DoesNotContain("org/llama: not in the hub cache", hub.stderr); // the model was: download cached it
        hub = Run(false, [.. generate, "--model", "org/llama@main", "--adapter", "org/llama-lora"]);
        Assert.True(hub.code == 0, hub.stderr);
        var local = Run(false, [.. generate, "--model", Fixtures.Model("llama"), "--adapter", adapter]);
        Assert.True(local.code == 0, local.stderr);
        Assert.Equal(OutputIds(local.stdout), OutputIds(hub.stdout));

        var missing = Run(false, "download", "org/nothing");
        Assert.Equal(1, missing.code);
        Assert.StartsWith("error: org/nothing: not found on", missing.stderr);
        Assert.Contains("no such repository", missing.stderr);
        Assert.Single(missing.stderr.Trim().Split('\n'));
    }

    /// <summary>HF_HOME places the cache at $HF_HOME/hub, and the token <c>huggingface-cli login</c> saved there opens a gated repository.</summary>
    [Fact]
    public void HfHomeHoldsTheCacheAndTheSavedToken()
    {
        string commit = _server.AddRepo("org/gated", Fixtures.Model("llama"));
        _server.Repos["org/gated"].Token = "hf_saved";
        string home = Path.Combine(_cache, "home");
        Directory.CreateDirectory(home);
        var env = new Dictionary<string, string?> { ["HF_ENDPOINT"] = _server.Endpoint, ["HF_HOME"] = home, ["HF_HUB_CACHE"] = null, ["HF_TOKEN"] = null, ["HF_HUB_OFFLINE"] = null };
        var denied = RunCli(env, "download", "org/gated");
        Assert.Equal(1, denied.code);
        Assert.Contains("set HF_TOKEN", denied.stderr);
        File.WriteAllText(Path.Combine(home, "token"), "hf_saved\n");
        var (code, stdout, stderr) = RunCli(env, "download", "org/gated");
        Assert.True(code == 0, stderr);
        Assert.Equal(Path.Combine(home, "hub", "models--org--gated", "snapshots", commit), stdout.Trim());
    }
}
