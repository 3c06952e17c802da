namespace LoraKit.Cli.Progress;

/// <summary>
/// Where long work reports how far it is: <c>Report(done, total, item)</c>. It is also an
/// <see cref="IProgress{T}"/> of <see cref="ProgressUpdate"/>, and <see cref="AsCallback"/> adapts it to the
/// library's <c>Action&lt;int, int, string&gt;</c> callbacks (e.g. <c>SuiteEvaluationOptions.Progress</c>). Safe to
/// call from any thread.
/// </summary>
public sealed class ProgressSink(Action<long, long, string?> report) : IProgress<ProgressUpdate>
{
    /// <summary><paramref name="done"/> of <paramref name="total"/> units; <paramref name="item"/> names the current one.</summary>
    public void Report(long done, long total, string? item = null) => report(done, total, item);

    /// <inheritdoc />
    public void Report(ProgressUpdate value) => report(value.Done, value.Total, value.Item);

    /// <summary>The sink as the library's (done, total, item) callback.</summary>
    public Action<int, int, string> AsCallback() => (done, total, item) => report(done, total, item);
}

/// <summary>One progress report: <paramref name="Done"/> of <paramref name="Total"/>, and the current item's name.</summary>
public readonly record struct ProgressUpdate(long Done, long Total, string? Item = null);
