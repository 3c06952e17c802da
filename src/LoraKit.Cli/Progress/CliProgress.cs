using System.Globalization;
using Spectre.Console;

namespace LoraKit.Cli.Progress;

/// <summary>
/// The CLI's one progress display for long work (download, quantize, merge, export, evaluation). The library reports
/// through a callback or <see cref="IProgress{T}"/> and never knows how it is drawn; a command wraps the work in
/// <see cref="Run{T}"/> and passes <see cref="ProgressSink.Report"/> (or the sink itself) to the library. Output goes to
/// stderr, so stdout stays the command's result. On a terminal it is a Spectre.Console bar; redirected, plain lines
/// such as <c>eval: 12/40 cases (30%)</c> — no carriage returns or escape sequences in a log file.
/// </summary>
public static class CliProgress
{
    /// <summary>
    /// Runs <paramref name="work"/> with a progress display labelled <paramref name="label"/>; <paramref name="unit"/>
    /// names what is counted ("cases", "tensors"; "bytes" shows sizes and a transfer rate).
    /// </summary>
    public static T Run<T>(string label, Func<ProgressSink, T> work, string unit = "", ProgressMode mode = ProgressMode.Auto) =>
        Run(label, work, unit, Resolve(mode), console: null, lines: Console.Error);

    /// <summary>As <see cref="Run{T}"/>, for work with no result.</summary>
    public static void Run(string label, Action<ProgressSink> work, string unit = "", ProgressMode mode = ProgressMode.Auto) =>
        Run<bool>(label, sink => { work(sink); return true; }, unit, mode);

    /// <summary>The mode <see cref="ProgressMode.Auto"/> stands for here: a bar only on an interactive stderr.</summary>
    public static ProgressMode Resolve(ProgressMode mode) =>
        mode != ProgressMode.Auto ? mode : Console.IsErrorRedirected ? ProgressMode.Lines : ProgressMode.Bar;

    /// <summary>The implementation, with the bar's console and the lines' writer given (the tests pass their own).</summary>
    internal static T Run<T>(string label, Func<ProgressSink, T> work, string unit, ProgressMode mode, IAnsiConsole? console, TextWriter lines)
    {
        switch (mode)
        {
            case ProgressMode.Off:
                return work(new ProgressSink((_, _, _) => { }));
            case ProgressMode.Lines:
            {
                var printer = new LinePrinter(label, unit, lines);
                var result = work(new ProgressSink(printer.Report));
                printer.Finish();
                return result;
            }
            default:
                return Bar(label, work, unit, console ?? AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) }));
        }
    }

    static T Bar<T>(string label, Func<ProgressSink, T> work, string unit, IAnsiConsole console)
    {
        bool bytes = unit == "bytes";
        ProgressColumn[] columns = bytes
            ? [new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new DownloadedColumn(), new TransferSpeedColumn(), new RemainingTimeColumn()]
            : [new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new CountColumn(unit), new RemainingTimeColumn()];
        return console.Progress().AutoClear(false).AutoRefresh(true).Columns(columns).Start(ctx =>
        {
            var task = ctx.AddTask(Markup.Escape(label), maxValue: 1);
            var sink = new ProgressSink((done, total, item) =>
            {
                task.MaxValue = Math.Max(total, 1);
                task.Value = Math.Min(done, task.MaxValue);
                task.Description = Markup.Escape(item is null ? label : $"{label} {Short(item)}");
            });
            var result = work(sink);
            task.Value = task.MaxValue; // the bar ends full even when the work's last report came before its end
            task.StopTask();
            return result;
        });
    }

    /// <summary>An item name (a model path, a file) cut to its last 30 characters for the bar's description.</summary>
    static string Short(string item) => item.Length <= 30 ? item : "…" + item[^29..];

    /// <summary>"3/40 cases" beside the bar.</summary>
    sealed class CountColumn(string unit) : ProgressColumn
    {
        public override Spectre.Console.Rendering.IRenderable Render(Spectre.Console.Rendering.RenderOptions options, ProgressTask task, TimeSpan deltaTime) =>
            new Text($"{task.Value:0}/{task.MaxValue:0}{(unit.Length > 0 ? " " + unit : "")}");
    }

    /// <summary>Plain lines: the first report, each further tenth of the work, and the end.</summary>
    sealed class LinePrinter(string label, string unit, TextWriter output)
    {
        readonly Lock _lock = new();
        int _lastTenth = -1;
        long _done, _total;
        string? _lastLine;

        public void Report(long done, long total, string? item)
        {
            lock (_lock)
            {
                (_done, _total) = (done, total);
                int tenth = total <= 0 ? 0 : (int)Math.Min(10, done * 10 / total);
                if (tenth <= _lastTenth) return;
                _lastTenth = tenth;
                Write();
            }
        }

        public void Finish()
        {
            lock (_lock)
                if (_total > 0 && _lastTenth < 10) Write();
        }

        void Write()
        {
            string amount = unit == "bytes"
                ? $"{Size(_done)} / {Size(_total)}"
                : $"{_done}/{_total}{(unit.Length > 0 ? " " + unit : "")}";
            string line = $"{label}: {amount} ({(_total <= 0 ? 0 : 100 * _done / _total)}%)";
            if (line == _lastLine) return;
            _lastLine = line;
            output.WriteLine(line);
        }

        static string Size(long bytes) => bytes switch
        {
            >= 1L << 30 => (bytes / (double)(1L << 30)).ToString("0.0", CultureInfo.InvariantCulture) + " GiB",
            >= 1L << 20 => (bytes / (double)(1L << 20)).ToString("0.0", CultureInfo.InvariantCulture) + " MiB",
            >= 1L << 10 => (bytes / (double)(1L << 10)).ToString("0.0", CultureInfo.InvariantCulture) + " KiB",
            _ => bytes + " B",
        };
    }
}
