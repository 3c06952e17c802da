using System.Security.Cryptography;

namespace LoraKit.IO;

/// <summary>
/// A file's identity for records such as a run's data: the sha256 of its bytes (hex, lower case) and its size, read in
/// pieces so a data file of many gigabytes is hashed without being held in memory.
/// </summary>
public static class FileDigest
{
    /// <summary>The sha256 (hex, lower case) and length of the file at <paramref name="path"/>.</summary>
    public static (string Sha256, long Bytes) Of(string path)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, FileOptions.SequentialScan);
        string sha256 = Convert.ToHexStringLower(SHA256.HashData(f)); // reads the stream in pieces
        return (sha256, f.Position);
    }
}
