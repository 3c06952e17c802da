using System.Diagnostics;
using System.IO.Compression;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Xml.Linq;

namespace LoraKit.Tests;

/// <summary>
/// The packages as a user gets them (issue 22): <c>dotnet pack</c> of the library and of the tool (this machine's RID)
/// into a local folder feed, then, with nothing from the source tree: the tool installed by <c>dotnet tool install</c>
/// and run, and an application (samples/PackageConsumer) built against the LoraKit *package* — with TorchSharp-cpu it
/// generates what the library generates in-process; without a backend it fails with the line naming the package.
/// Isolation: the build goes to its own artifacts folder (the source tree's bin/obj are untouched), restores of the
/// locally built packages go to a temporary NUGET_PACKAGES (the machine's cache only serves, read-only, as a fallback
/// folder for TorchSharp and the rest), and the temporary folder is deleted at the end.
/// </summary>
public sealed class PackedFeed : IDisposable
{
    /// <summary>nuget.org refuses packages over 250 MB.</summary>
    public const long NuGetOrgLimit = 250L * 1000 * 1000;

    public string Root { get; } = Path.Combine(Path.GetTempPath(), "lorakit-pack-" + Guid.NewGuid().ToString("N")[..12]);
    public string Feed => Path.Combine(Root, "feed");
    public string Packages => Path.Combine(Root, "nuget-packages");
    public string Version { get; } = VersionPrefix();
    public string Rid { get; } = RuntimeInformation.RuntimeIdentifier;

    public PackedFeed()
    {
        Directory.CreateDirectory(Feed);
        string artifacts = Path.Combine(Root, "artifacts");
        foreach (var (project, extra) in new[] { ("src/LoraKit/LoraKit.csproj", ""), ("src/LoraKit.Cli/LoraKit.Cli.csproj", $"-p:ToolPackageRuntimeIdentifiers={Rid}") })
        {
            string[] args = ["pack", Path.Combine(Fixtures.Root, project), "-c", "Release", "--nologo", "-o", Feed, "--artifacts-path", artifacts];
            var r = Dotnet.Run(Fixtures.Root, [.. args, .. extra.Length > 0 ? new[] { extra } : []], timeoutSeconds: 600);
            Assert.True(r.Code == 0, $"dotnet pack {project} failed:\n{r.Tail}");
        }
        // the built binaries (a publish folder per RID: 1 GB) are not needed once the packages exist
        Directory.Delete(artifacts, recursive: true);
        File.WriteAllText(Path.Combine(Root, "nuget.config"), $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources><clear /><add key="local" value="{Feed}" /></packageSources>
              <fallbackPackageFolders><clear /><add key="machine" value="{MachinePackages()}" /></fallbackPackageFolders>
            </configuration>
            """);
    }

    /// <summary>Path of the package <paramref name="id"/> in the feed.</summary>
    public string Package(string id) => Path.Combine(Feed, $"{id}.{Version}.nupkg");

    public void Dispose()
    {
        try { Directory.Delete(Root, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    static string VersionPrefix() =>
        XDocument.Load(Path.Combine(Fixtures.Root, "Directory.Build.props")).Descendants("VersionPrefix").Single().Value;

    /// <summary>The machine's NuGet package folder, where the test build restored TorchSharp and the rest.</summary>
    static string MachinePackages() => Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p
        ? p : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
}

public sealed class PackageTests(PackedFeed feed) : IClassFixture<PackedFeed>
{
    [Fact]
    public void PackagesCarryCompleteMetadataAndFitNuGetOrg()
    {
        foreach (var file in Directory.GetFiles(feed.Feed, "*.nupkg"))
            Assert.True(new FileInfo(file).Length < PackedFeed.NuGetOrgLimit, $"{Path.GetFileName(file)}: {new FileInfo(file).Length / 1e6:F0} MB");
        string[] expected = ["LoraKit", "LoraKit.Tool", $"LoraKit.Tool.{feed.Rid}"];
        foreach (var id in expected)
        {
            var nuspec = Nuspec(feed.Package(id), out var entries);
            string Meta(string name) => nuspec.Descendants().FirstOrDefault(e => e.Name.LocalName == name)?.Value ?? "";
            Assert.Equal(id, Meta("id"));
            Assert.Equal(feed.Version, Meta("version"));
            Assert.Equal("MIT", Meta("license"));
            Assert.Equal("README.md", Meta("readme"));
            Assert.Contains("README.md", entries);
            Assert.False(string.IsNullOrWhiteSpace(Meta("description")));
            Assert.NotEqual("Package Description", Meta("description"));
            Assert.StartsWith("https://", nuspec.Descendants().Single(e => e.Name.LocalName == "repository").Attribute("url")!.Value);
            Assert.False(string.IsNullOrWhiteSpace(Meta("tags")));
        }

        // The library: managed TorchSharp only (the application picks the backend), its XML docs, and its symbols.
        var library = Nuspec(feed.Package("LoraKit"), out var libEntries);
        var deps = library.Descendants().Where(e => e.Name.LocalName == "dependency").Select(e => e.Attribute("id")!.Value).ToList();
        Assert.Contains("TorchSharp", deps);
        Assert.DoesNotContain(deps, d => d.StartsWith("TorchSharp-", StringComparison.OrdinalIgnoreCase) || d.StartsWith("libtorch", StringComparison.OrdinalIgnoreCase));
        Assert.Contains("lib/net10.0/LoraKit.xml", libEntries);
        Assert.True(File.Exists(Path.Combine(feed.Feed, $"LoraKit.{feed.Version}.snupkg")));

        // The tool: a pointer package naming this RID's package, which carries only this platform's libtorch.
        Nuspec(feed.Package("LoraKit.Tool"), out var pointerEntries);
        Assert.DoesNotContain(pointerEntries, e => e.Contains("libtorch", StringComparison.OrdinalIgnoreCase) || e.EndsWith(".dll", StringComparison.Ordinal));
        Nuspec(feed.Package($"LoraKit.Tool.{feed.Rid}"), out var ridEntries);
        Assert.Contains(ridEntries, e => e.Contains("torch_cpu", StringComparison.Ordinal));
        Assert.DoesNotContain(ridEntries, e => e.Contains("runtimes/", StringComparison.Ordinal) && !e.Contains(feed.Rid, StringComparison.Ordinal));
    }

    [Fact]
    public void ToolInstallsFromTheFeedAndRuns()
    {
        string tools = Path.Combine(feed.Root, "tools"), work = Path.Combine(feed.Root, "tool-work");
        Directory.CreateDirectory(work);
        var install = Dotnet.Run(work, ["tool", "install", "--tool-path", tools, "--configfile", Path.Combine(feed.Root, "nuget.config"), "LoraKit.Tool", "--version", feed.Version], packages: feed.Packages);
        Assert.True(install.Code == 0, install.Tail);
        string lorakit = Path.Combine(tools, OperatingSystem.IsWindows() ? "lorakit.exe" : "lorakit");

        var version = Dotnet.Exec(lorakit, work, ["--version"]);
        Assert.True(version.Code == 0, version.Tail);
        Assert.StartsWith(feed.Version, version.Stdout.Trim());

        // A real command on a real model: the installed tool generates what the library generates in-process.
        string model = Fixtures.Model("llama");
        var generate = Dotnet.Exec(lorakit, work, ["generate", "--model", model, "--prompt", "hello", "--max-new-tokens", "6", "--temperature", "0", "--json"]);
        Assert.True(generate.Code == 0, generate.Tail);
        using var doc = JsonDocument.Parse(generate.Stdout);
        using var lm = LoraKitModel.FromPretrained(model, device: "cpu");
        Assert.Equal(lm.Generate("hello", new() { MaxNewTokens = 6 }).OutputIds, doc.RootElement.GetProperty("output_ids").EnumerateArray().Select(x => x.GetInt32()));

        // The whole job (train, evaluate, gate, merge, use) from the installed tool, as the README's first command.
        var demo = Dotnet.Exec(lorakit, work, ["demo"], timeoutSeconds: 600);
        Assert.True(demo.Code == 0, demo.Tail);
        Assert.True(File.Exists(Path.Combine(work, "out", "demo", "eval", "eval.html")), demo.Tail);
    }

    [Fact]
    public void ApplicationBuildsAgainstTheLibraryPackage()
    {
        string model = Fixtures.Model("llama");
        var withBackend = BuildConsumer("with-backend", withBackend: true);
        var run = Dotnet.Run(feed.Root, [withBackend, model, "hello"], packages: feed.Packages);
        Assert.True(run.Code == 0, run.Tail);
        using var lm = LoraKitModel.FromPretrained(model, device: "cpu");
        var expected = lm.Generate("hello", new() { MaxNewTokens = 8 }).OutputIds;
        Assert.Contains("ids: " + string.Join(' ', expected), run.Stdout);

        // No backend: one line naming the package to add. NUGET_PACKAGES is the isolated folder, which holds no
        // libtorch, so TorchSharp's own fallback (probing the machine's package cache) finds none either.
        var bare = BuildConsumer("no-backend", withBackend: false);
        var failed = Dotnet.Run(feed.Root, [bare, model, "hello"], packages: feed.Packages);
        Assert.Equal(1, failed.Code);
        var line = failed.Stderr.Trim();
        Assert.StartsWith("error: no TorchSharp native backend could be loaded", line);
        Assert.Contains("TorchSharp-cpu", line);
        Assert.DoesNotContain('\n', line);
    }

    /// <summary>Copies samples/PackageConsumer beside the feed, builds it against the feed, returns its dll.</summary>
    string BuildConsumer(string name, bool withBackend)
    {
        string dir = Path.Combine(feed.Root, name);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Path.Combine(Fixtures.Root, "samples", "PackageConsumer")))
            File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        File.Copy(Path.Combine(feed.Root, "nuget.config"), Path.Combine(dir, "nuget.config"));
        var build = Dotnet.Run(dir, ["build", "-c", "Release", "--nologo", "-o", Path.Combine(dir, "out"),
            $"-p:LoraKitVersion={feed.Version}", $"-p:WithBackend={(withBackend ? "true" : "false")}"], packages: feed.Packages, timeoutSeconds: 600);
        Assert.True(build.Code == 0, build.Tail);
        return Path.Combine(dir, "out", "PackageConsumer.dll");
    }

    static XElement Nuspec(string nupkg, out List<string> entries)
    {
        Assert.True(File.Exists(nupkg), $"{Path.GetFileName(nupkg)} was not packed");
        using var zip = ZipFile.OpenRead(nupkg);
        entries = zip.Entries.Select(e => e.FullName).ToList();
        var spec = zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal) && !e.FullName.Contains('/'));
        using var s = spec.Open();
        return XDocument.Load(s).Root!;
    }
}

/// <summary>Child processes of the SDK or of an installed tool, with the environment a user's shell would give them.</summary>
static class Dotnet
{
    public sealed record Result(int Code, string Stdout, string Stderr)
    {
        /// <summary>The end of both streams, for an assertion message.</summary>
        public string Tail => (Stdout.Length > 3000 ? Stdout[^3000..] : Stdout) + "\n" + (Stderr.Length > 3000 ? Stderr[^3000..] : Stderr);
    }

    public static Result Run(string workDir, string[] args, string? packages = null, int timeoutSeconds = 300) =>
        Exec(DotnetHost(), workDir, args, packages, timeoutSeconds);

    public static Result Exec(string program, string workDir, string[] args, string? packages = null, int timeoutSeconds = 300)
    {
        var psi = new ProcessStartInfo(program) { WorkingDirectory = workDir, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        // The test host runs under MSBuild/VSTest variables that would steer a child build; a user's shell has none.
        foreach (var key in psi.Environment.Keys.Where(k => k.StartsWith("MSBUILD", StringComparison.OrdinalIgnoreCase) || k.StartsWith("VSTEST", StringComparison.OrdinalIgnoreCase)).ToList())
            psi.Environment.Remove(key);
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_NOLOGO"] = "1";
        // an installed tool's launcher finds the runtime through DOTNET_ROOT (the SDK here may not be at the default place)
        if (Path.IsPathRooted(DotnetHost()))
            psi.Environment["DOTNET_ROOT"] = Path.GetDirectoryName(new FileInfo(DotnetHost()).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? DotnetHost());
        if (packages is not null) psi.Environment["NUGET_PACKAGES"] = packages;
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeoutSeconds * 1000)) { p.Kill(true); throw new TimeoutException($"{Path.GetFileName(program)} {string.Join(' ', args)} did not finish in {timeoutSeconds} s"); }
        return new Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>The dotnet executable running these tests (the SDK's host), else the one on PATH.</summary>
    static string DotnetHost()
    {
        if (Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host)) return host;
        if (Environment.ProcessPath is { } self && Path.GetFileNameWithoutExtension(self) == "dotnet") return self;
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator))
            if (File.Exists(Path.Combine(dir, "dotnet"))) return Path.GetFullPath(Path.Combine(dir, "dotnet"));
        return "dotnet";
    }
}
