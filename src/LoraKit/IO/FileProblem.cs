namespace LoraKit.IO;

/// <summary>
/// Why a file could not be opened, in a few words for an error line that already names the file: a dangling link,
/// a link loop, permissions — instead of the exception's type name or .NET's sentence with the path repeated.
/// </summary>
internal static class FileProblem
{
    public static string Describe(string path, Exception e) => e switch
    {
        FileNotFoundException or DirectoryNotFoundException when new FileInfo(path).LinkTarget is string target
            => $"is a symbolic link to '{target}', which does not exist",
        FileNotFoundException or DirectoryNotFoundException => "not found",
        UnauthorizedAccessException => "permission denied",
        IOException when e.Message.Contains("symbolic links", StringComparison.OrdinalIgnoreCase)
            => "cannot be read: too many levels of symbolic links (a link loop?)",
        _ => "cannot be read: " + e.Message.Replace($" : '{path}'", "").Replace($"'{path}'", "the file").TrimEnd('.'),
    };

    /// <summary>Opens a file for reading; failures become a <see cref="LoraKitException"/> naming the file and the reason.</summary>
    public static FileStream OpenRead(string path)
    {
        try { return File.OpenRead(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new LoraKitException($"{path}: {Describe(path, e)}"); }
    }

    /// <summary>
    /// Opens a regular file for reading in bounded time: opening a named pipe blocks until something writes to it, so
    /// the open runs on another thread and a path that does not open within <paramref name="timeout"/> is refused, as is
    /// anything that opens but cannot seek (a pipe, socket or terminal, which may never end). Failures are one
    /// <see cref="LoraKitException"/> line naming the file.
    /// </summary>
    public static FileStream OpenPromptly(string path, TimeSpan timeout)
    {
        var open = Task.Run(() => OpenRead(path));
        bool done;
        try { done = open.Wait(timeout); }
        catch (AggregateException e) when (e.InnerException is LoraKitException inner) { throw inner; }
        if (!done)
        {
            // Left behind: if the pipe is ever opened, close it; a failure then has nobody to report to.
            open.ContinueWith(t => { if (t.IsCompletedSuccessfully) t.Result.Dispose(); else _ = t.Exception; }, TaskScheduler.Default);
            throw new LoraKitException($"{path}: could not be opened within {timeout.TotalSeconds:0} s (a named pipe with no writer?); give a regular file");
        }
        var fs = open.Result;
        if (fs.CanSeek) return fs;
        fs.Dispose();
        throw new LoraKitException($"{path}: not a regular file (a pipe or a device?)");
    }

    /// <summary>
    /// The whole file, refusing more than <paramref name="maxBytes"/> — also for devices (/dev/zero) and pipes, whose
    /// length reads 0 and which would otherwise be read until memory runs out.
    /// </summary>
    public static byte[] ReadAllBytes(string path, long maxBytes)
    {
        using var fs = OpenRead(path);
        return ReadAllBytes(fs, path, maxBytes);
    }

    /// <summary>The most LoraKit reads from a file that reports no length (a device, a pipe, a procfs entry).</summary>
    public const long UnsizedMaxBytes = 4L << 20;

    /// <summary>The rest of an open stream, bounded as <see cref="ReadAllBytes(string, long)"/>; errors name <paramref name="path"/>.</summary>
    public static byte[] ReadAllBytes(FileStream fs, string path, long maxBytes)
    {
        try
        {
            long length = fs.CanSeek ? fs.Length : 0;
            // A file that reports no length (a device such as /dev/zero, a pipe, a procfs entry) is not what anyone hands
            // LoraKit as a config or report: a few MiB is enough to say so, instead of reading up to the full bound.
            if (length == 0) maxBytes = Math.Min(maxBytes, UnsizedMaxBytes);
            if (length > maxBytes) throw new LoraKitException($"{path}: {length:N0} bytes, more than the {maxBytes:N0} bytes LoraKit reads from such a file");
            using var ms = new MemoryStream(length > 0 ? (int)length : 0);
            var buffer = new byte[1 << 16];
            int read;
            while ((read = fs.Read(buffer, 0, buffer.Length)) > 0)
            {
                if (ms.Length + read > maxBytes)
                    throw new LoraKitException($"{path}: more than {maxBytes:N0} bytes{(length == 0 ? " (a device or a pipe?)" : "")}, more than LoraKit reads from such a file");
                ms.Write(buffer, 0, read);
            }
            return ms.ToArray();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new LoraKitException($"{path}: {Describe(path, e)}"); }
    }
}
