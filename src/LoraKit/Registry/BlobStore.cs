using System.Security.Cryptography;

namespace LoraKit.Registry;

/// <summary>
/// Content-addressed files under <c>blobs/sha256/&lt;first two hex&gt;/&lt;hash&gt;</c>: a blob's name is the sha256 of its
/// bytes, so storing the same file twice stores it once, and reading one back checks the bytes against the name (a
/// truncated or altered blob is an error, never a wrong adapter). Writes go to a temporary file and are renamed into place.
/// </summary>
internal sealed class BlobStore(string root)
{
    /// <summary>The folder holding the blobs.</summary>
    public string Root { get; } = Path.Combine(root, "blobs", "sha256");

    /// <summary>Where the blob with this hash lives.</summary>
    public string PathOf(string sha256) => Path.Combine(Root, sha256[..2], sha256);

    /// <summary>Stores <paramref name="file"/>'s bytes; returns their sha256 and length.</summary>
    public (string Sha256, long Size) Put(string file)
    {
        Directory.CreateDirectory(Root);
        string tmp = Path.Combine(Root, $".tmp-{Guid.NewGuid():N}");
        try
        {
            string sha;
            long size;
            using (var src = File.OpenRead(file))
            using (var dst = File.Create(tmp))
            {
                sha = CopyHashing(src, dst);
                size = dst.Length;
            }
            var target = PathOf(sha);
            Directory.CreateDirectory(Path.GetDirectoryName(target)!);
            if (File.Exists(target) && Hash(target) == sha) File.Delete(tmp); // already stored (and intact)
            else File.Move(tmp, target, overwrite: true);                   // new, or replaces a corrupted copy
            return (sha, size);
        }
        finally { if (File.Exists(tmp)) File.Delete(tmp); }
    }

    /// <summary>
    /// Copies the blob to <paramref name="dest"/>, checking its bytes against its name; <paramref name="what"/> names the
    /// version in the error. A missing or corrupted blob leaves no file at <paramref name="dest"/>.
    /// </summary>
    public void CopyTo(string sha256, string dest, string what)
    {
        var path = PathOf(sha256);
        if (!File.Exists(path)) throw new LoraKitException($"registry: {what}: blob {sha256[..12]} is missing from {Root} (the registry is damaged; re-add the adapter)");
        string actual;
        using (var src = File.OpenRead(path))
        using (var dst = File.Create(dest)) actual = CopyHashing(src, dst);
        if (actual != sha256)
        {
            File.Delete(dest);
            throw new LoraKitException($"registry: {what}: blob {sha256[..12]} is corrupted (its bytes hash to {actual[..12]}); re-add the adapter");
        }
    }

    /// <summary>The sha256 of a file's bytes.</summary>
    public static string Hash(string path) => IO.FileDigest.Of(path).Sha256;

    /// <summary>Every stored blob's hash (temporary files excluded).</summary>
    public IEnumerable<string> All() =>
        Directory.Exists(Root)
            ? Directory.EnumerateFiles(Root, "*", SearchOption.AllDirectories).Select(Path.GetFileName).OfType<string>().Where(n => n.Length == 64 && !n.StartsWith('.'))
            : [];

    static string CopyHashing(Stream src, Stream dst)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = new byte[1 << 20];
        int n;
        while ((n = src.Read(buffer, 0, buffer.Length)) > 0)
        {
            hash.AppendData(buffer, 0, n);
            dst.Write(buffer, 0, n);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }
}
