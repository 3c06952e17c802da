namespace LoraKit.IO;

/// <summary>
/// Checks made before anything is written to an output directory that must be new or empty, so a bad path fails at
/// once with the reason instead of after minutes of work (and with a temporary directory left behind).
/// </summary>
internal static class OutputDirectory
{
    public static void EnsureNewOrEmpty(string outDir)
    {
        var full = Path.GetFullPath(outDir);
        if (Directory.Exists(full))
        {
            if (Directory.EnumerateFileSystemEntries(full).Any())
                throw new LoraKitException($"output directory '{outDir}' exists and is not empty");
            return;
        }
        if (File.Exists(full) || new FileInfo(full).LinkTarget is not null)
            throw new LoraKitException($"output '{outDir}' exists and is not a directory");
        for (var parent = Path.GetDirectoryName(full); parent is not null; parent = Path.GetDirectoryName(parent))
        {
            if (Directory.Exists(parent)) return;
            if (File.Exists(parent) || new FileInfo(parent).LinkTarget is not null)
                throw new LoraKitException($"cannot create output directory '{outDir}': '{parent}' is not a directory");
        }
    }
}
