namespace LoraKit.Hub;

/// <summary>
/// One step of a download: <paramref name="File"/> of <paramref name="Repo"/> has <paramref name="Bytes"/> of
/// <paramref name="Total"/> bytes (reported at the start, every few MiB, and at the end, where Bytes == Total).
/// <paramref name="Note"/> is a line for people instead ("resuming …", "using the cache …") with no byte counts.
/// </summary>
public sealed record HubProgress(string Repo, string File, long Bytes, long Total, string? Note = null);

/// <summary>
/// Progress as plain lines on a writer (stderr in the CLI): one line when a file starts, every 10% of a large file, and
/// when it ends; notes as they come. Plain lines read well in logs and CI, where a redrawn bar does not.
/// </summary>
public sealed class HubProgressLines(TextWriter writer) : IProgress<HubProgress>
{
    readonly Dictionary<string, int> _tenths = [];

    /// <inheritdoc/>
    public void Report(HubProgress p)
    {
        if (p.Note is not null) { writer.WriteLine(p.Note); return; }
        string key = p.Repo + "/" + p.File;
        int tenth = p.Total <= 0 ? 10 : (int)(p.Bytes * 10 / p.Total);
        bool first = !_tenths.TryGetValue(key, out int last);
        if (!first && tenth <= last) return;
        if (!first && tenth < 10 && p.Total < (64 << 20)) return; // small files: start and end only
        _tenths[key] = tenth;
        writer.WriteLine($"{p.Repo}: {p.File} {Size(p.Bytes)} / {Size(p.Total)}{(tenth >= 10 ? " done" : "")}");
    }

    static string Size(long bytes) => bytes >= 1 << 30 ? $"{bytes / (double)(1 << 30):F2} GiB"
        : bytes >= 1 << 20 ? $"{bytes / (double)(1 << 20):F1} MiB" : $"{bytes / 1024.0:F1} KiB";
}
