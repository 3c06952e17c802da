using System.Diagnostics;

namespace LoraKit.Tests;

/// <summary>A <c>lorakit serve</c> child process (the built CLI), its stderr, and the URL it says it listens on.</summary>
internal static class ServeProcess
{
    /// <summary>Starts <c>serve</c> with <paramref name="args"/> and waits for its "listening on URL" line (null URL: it exited first).</summary>
    public static async Task<(Process Process, string? Url, Task<string> Stderr)> StartAsync(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { Path.Combine(AppContext.BaseDirectory, "LoraKit.Cli.dll"), "serve" }.Concat(args)) psi.ArgumentList.Add(a);
        var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        string? url = null;
        while (url is null && await p.StandardOutput.ReadLineAsync() is string line)
            if (line.Contains("listening on ")) url = line.Split("listening on ")[1].Split(' ')[0];
        return (p, url, stderr);
    }
}
