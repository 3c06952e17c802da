using System.Collections.Concurrent;
using System.Diagnostics;
using System.Security.Cryptography;
using System.Text.RegularExpressions;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// The contract every malformed input must meet (issue 16): the operation either succeeds or fails with a clean error —
/// a <see cref="LoraKitException"/> (or a plain .NET error type that LoraKit's own code threw on purpose) whose message is
/// one line, names what is wrong and carries no stack trace, library internals or BCL boilerplate — within a time bound,
/// with bounded memory, and without touching anything outside the directory it was given.
///
/// Case counts: <c>./test</c> runs the default sizes; <c>./test --fuzz</c> sets LORAKIT_FUZZ=long and every generator
/// scales by <see cref="Scale"/>. Each outcome is appended to the tally (<see cref="Tally"/>), and written to
/// $LORAKIT_FUZZ_REPORT (TSV: area, case, outcome, detail) when that variable is set, so the counts can be reported.
/// </summary>
public static class FuzzContract
{
    /// <summary>1 under ./test, larger under ./test --fuzz.</summary>
    public static int Scale { get; } = Environment.GetEnvironmentVariable("LORAKIT_FUZZ") == "long" ? 8 : 1;

    /// <summary>Wall-clock bound for one in-process case.</summary>
    public static TimeSpan DefaultLimit { get; } = TimeSpan.FromSeconds(10);

    /// <summary>Process-wide peak working set that no case may push us past.</summary>
    public const long MemoryBoundBytes = 6L << 30;

    public static ConcurrentQueue<(string Area, string Case, string Outcome, string Detail)> Tally { get; } = new();

    static readonly object ReportLock = new();

    // Fuzz inputs include lone surrogates; the report writes them as U+FFFD instead of throwing.
    static readonly System.Text.UTF8Encoding Lenient = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: false);

    // .NET's and libraries' own wording: a message containing any of these leaked an internal failure to the user.
    static readonly string[] LeakMarkers =
    [
        "   at ", "frame #", "Object reference not set", "Index was outside", "Arithmetic operation resulted",
        "Specified argument was out of the range", "Exception of type", "Path: $", "LineNumber:", "BytePositionInLine",
        "The given key", "Unable to cast", "Input string was not in a correct format", "Value was either too large",
        "Sequence contains no", "Nullable object must have a value", "c10::", "TorchSharp.",
        "System.", "An element of type", "cannot be converted to", "Collection was modified", "Stack overflow",
    ];

    // Exception types that, thrown by LoraKit's own code with its own message, are deliberate errors.
    static readonly Type[] DeliberateTypes =
    [
        typeof(ArgumentException), typeof(InvalidOperationException), typeof(InvalidDataException), typeof(NotSupportedException),
        typeof(FileNotFoundException), typeof(DirectoryNotFoundException), typeof(KeyNotFoundException), typeof(IOException),
        typeof(TimeoutException), typeof(FormatException),
    ];

    /// <summary>Outcome of one case: null when clean, else why not.</summary>
    public static string? Judge(Exception? e)
    {
        if (e is null) return null;
        if (e is AggregateException { InnerExceptions.Count: 1 } ae) e = ae.InnerException!;
        bool ours = e is LoraKitException
                    || (DeliberateTypes.Contains(e.GetType()) && (e.TargetSite?.DeclaringType?.FullName?.StartsWith("LoraKit", StringComparison.Ordinal) ?? false));
        if (!ours) return $"{e.GetType().Name} escaped: {FirstLine(e.Message)}";
        return JudgeMessage(e.Message);
    }

    /// <summary>Null when an error message is one clean line, else why not.</summary>
    public static string? JudgeMessage(string message)
    {
        var m = message.TrimEnd('\n', '\r');
        if (m.Length == 0) return "empty message";
        if (m.Contains('\n')) return $"multi-line message: {FirstLine(m)}";
        if (m.Length > 2000) return "message over 2000 characters";
        foreach (var marker in LeakMarkers)
            if (m.Contains(marker, StringComparison.Ordinal)) return $"message leaks '{marker.Trim()}': {m}";
        return null;
    }

    static string FirstLine(string s) => s.Split('\n')[0];

    /// <summary>
    /// Runs one case on its own thread (big stack, so a runaway recursion is caught as our error or shows as a crash of
    /// this case, not of the test host) and asserts the contract. Returns the exception, if any, for further checks.
    /// </summary>
    public static Exception? Check(string area, string caseName, Action act, TimeSpan? limit = null)
    {
        Exception? caught = null;
        var t = new Thread(() => { try { act(); } catch (Exception e) { caught = e; } }, 64 << 20) { IsBackground = true };
        var sw = Stopwatch.StartNew();
        t.Start();
        var bound = limit ?? DefaultLimit;
        if (!t.Join(bound))
        {
            Record(area, caseName, "hang", $"still running after {bound.TotalSeconds:0} s");
            Assert.Fail($"[{area}] {caseName}: still running after {bound.TotalSeconds:0} s");
        }
        var verdict = Judge(caught);
        using (var p = Process.GetCurrentProcess())
            if (p.PeakWorkingSet64 > MemoryBoundBytes) verdict ??= $"peak working set {p.PeakWorkingSet64 >> 20} MiB";
        Record(area, caseName, verdict is null ? (caught is null ? "ok" : "clean-error") : "unclean", verdict ?? caught?.Message ?? "");
        Assert.True(verdict is null, $"[{area}] {caseName}: {verdict}");
        return caught;
    }

    /// <summary>The contract for a CLI run: exit 0, or exit 1 with exactly one "error: ..." line on stderr.</summary>
    public static void CheckCli(string area, string caseName, int code, string stderr)
    {
        string? verdict = code switch
        {
            0 => null,
            1 => stderr.TrimEnd('\n', '\r') is var s && s.StartsWith("error: ", StringComparison.Ordinal) && !s.Contains('\n')
                ? JudgeMessage(s) : $"stderr is not one 'error:' line: {Trunc(stderr)}",
            _ => $"exit code {code}: {Trunc(stderr)}",
        };
        Record(area, caseName, verdict is null ? (code == 0 ? "ok" : "clean-error") : "unclean", verdict ?? stderr.Trim());
        Assert.True(verdict is null, $"[{area}] {caseName}: {verdict}");
    }

    static string Trunc(string s) => s.Length > 400 ? s[..400] + "…" : s;

    public static void Record(string area, string caseName, string outcome, string detail)
    {
        Tally.Enqueue((area, caseName, outcome, detail));
        if (Environment.GetEnvironmentVariable("LORAKIT_FUZZ_REPORT") is string path && path.Length > 0)
            lock (ReportLock)
                File.AppendAllText(path, $"{area}\t{Regex.Replace(caseName, @"\s+", " ")}\t{outcome}\t{Regex.Replace(detail, @"\s+", " ")}\n", Lenient);
    }

    /// <summary>
    /// A fingerprint of every file under a directory (path, size, content hash), to assert that an operation touched
    /// nothing outside what it was allowed to write.
    /// </summary>
    public static Dictionary<string, string> Snapshot(string dir)
    {
        var result = new Dictionary<string, string>();
        if (!Directory.Exists(dir)) return result;
        foreach (var f in Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories))
            result[Path.GetRelativePath(dir, f)] = Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(f)));
        return result;
    }

    public static void AssertUntouched(Dictionary<string, string> before, string dir, string what)
    {
        var after = Snapshot(dir);
        foreach (var (path, hash) in before)
        {
            Assert.True(after.TryGetValue(path, out var h), $"{what}: {path} was deleted");
            Assert.True(h == hash, $"{what}: {path} was changed");
        }
    }

    /// <summary>A deterministic random source per case set, so a failure reproduces from its case name.</summary>
    public static Random Rng(string seedText) => new(BitConverter.ToInt32(SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(seedText)), 0));
}
