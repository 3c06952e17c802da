using System.Text.RegularExpressions;
using LoraKit.Cli.Progress;
using Spectre.Console.Testing;

namespace LoraKit.Tests;

/// <summary>
/// The CLI's progress display (src/LoraKit.Cli/Progress): a Spectre.Console bar on a terminal, plain lines when stderr
/// is redirected — the form logs and CI read, so it must stay lines without carriage returns or escape sequences.
/// </summary>
public class ProgressTests
{
    static readonly Regex EscapeOrReturn = new("[\r\u001b]");

    [Fact]
    public void RedirectedProgressIsOneLinePerTenthAndTheEnd()
    {
        var output = new StringWriter();
        int result = CliProgress.Run("merge", sink =>
        {
            for (int i = 0; i <= 40; i++) sink.Report(i, 40, $"layer {i}");
            return 7;
        }, "tensors", ProgressMode.Lines, console: null, lines: output);
        Assert.Equal(7, result);
        var lines = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd()).ToList();
        Assert.Equal(Enumerable.Range(0, 11).Select(t => $"merge: {t * 4}/40 tensors ({t * 10}%)"), lines);
        Assert.DoesNotMatch(EscapeOrReturn, output.ToString().Replace(Environment.NewLine, "\n"));
    }

    [Fact]
    public void RedirectedByteProgressShowsSizesAndEndsOnceWhenTheWorkStopsShort()
    {
        var output = new StringWriter();
        CliProgress.Run("download", sink =>
        {
            sink.Report(0, 3 << 20);
            sink.Report(3 << 19, 3 << 20, "model.safetensors");
            return 0;
        }, "bytes", ProgressMode.Lines, console: null, lines: output);
        Assert.Equal(["download: 0 B / 3.0 MiB (0%)", "download: 1.5 MiB / 3.0 MiB (50%)"],
            output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd()));
    }

    [Fact]
    public void TerminalProgressIsASpectreBarThatEndsFull()
    {
        var console = new TestConsole().Interactive().EmitAnsiSequences();
        console.Profile.Width = 100;
        CliProgress.Run("export", sink =>
        {
            for (int i = 1; i <= 5; i++) sink.Report(i, 10, "blk." + i); // stops at half: the bar still ends full
            return 0;
        }, "tensors", ProgressMode.Bar, console, lines: TextWriter.Null);
        var text = console.Output;
        Assert.Contains("export", text);
        Assert.Contains("100%", text);
        Assert.Contains("10/10 tensors", text);
    }

    [Fact]
    public void OffPrintsNothing()
    {
        var output = new StringWriter();
        CliProgress.Run("eval", sink => { sink.Report(1, 2); return 0; }, "cases", ProgressMode.Off, console: null, lines: output);
        Assert.Equal("", output.ToString());
    }

    [Fact]
    public void EvalWithRedirectedStderrPrintsPlainProgressLines()
    {
        var (code, stdout, stderr) = CliTests.RunCli("eval", "--model", Fixtures.Model("llama"), "--suite", "lorakit:capability", "--device", "cpu");
        Assert.True(code == 0, stderr);
        Assert.Contains("capability", stdout);
        var lines = stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.NotEmpty(lines);
        Assert.All(lines, l => Assert.Matches(@"^eval: \d+/\d+ cases \(\d+%\)$", l));
        Assert.EndsWith("(100%)", lines[^1]);
        Assert.DoesNotMatch(EscapeOrReturn, stderr);
    }

    /// <summary>The other long commands report through the same helper: redirected, plain lines ending at 100%.</summary>
    [Theory]
    [InlineData("quantize")]
    [InlineData("export")]
    [InlineData("merge")]
    public void LongCommandsWithRedirectedStderrPrintPlainProgressLines(string command)
    {
        var output = Path.Combine(Fixtures.TempDir(), "out");
        string[] args = command switch
        {
            "quantize" => ["quantize", "--model", Fixtures.Model("llama"), "--method", "nf4", "--output", output],
            "export" => ["export", "gguf", "--model", Fixtures.Model("llama"), "--output", output + ".gguf"],
            _ => ["merge", "--model", Fixtures.Model("llama"), "--adapter", Fixtures.Path_("adapters", "llama", "a"), "--output", output, "--no-gate"],
        };
        var (code, _, stderr) = CliTests.RunCli(args);
        Assert.True(code == 0, stderr);
        var progress = stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => Regex.IsMatch(l, @"^[a-z ]+: \d+/\d+ [a-z]+ \(\d+%\)$")).ToList();
        Assert.NotEmpty(progress);
        Assert.EndsWith("(100%)", progress[^1]);
        Assert.DoesNotMatch(EscapeOrReturn, stderr);
    }
}
