using System.Text.RegularExpressions;

namespace LoraKit.Hub;

/// <summary>
/// The hub cache exactly as <c>huggingface_hub</c> lays it out, so both tools read what the other wrote:
/// <c>ROOT/models--ORG--NAME/blobs/ETAG</c> (file contents, named by their etag: the sha256 of an LFS file, the git blob id
/// of another), <c>refs/REVISION</c> (the commit sha a branch or tag pointed to, no newline), and
/// <c>snapshots/COMMIT/FILE</c> (a relative symlink <c>../../blobs/ETAG</c>; a copy where symlinks cannot be made).
/// A download in progress is <c>blobs/ETAG.incomplete</c>; a blob appears under its name only once complete and checked.
/// </summary>
public sealed partial class HubCache(string root)
{
    [GeneratedRegex("^[A-Za-z0-9_-]{1,128}$")]
    private static partial Regex EtagPattern();

    /// <summary>The cache folder.</summary>
    public string Root { get; } = Path.GetFullPath(root);

    /// <summary>The repository's folder.</summary>
    public string RepoDir(HubRepoId id) => Path.Combine(Root, id.FolderName);

    /// <summary>The snapshot folder of <paramref name="commit"/>.</summary>
    public string SnapshotDir(HubRepoId id, string commit) => Path.Combine(RepoDir(id), "snapshots", commit);

    /// <summary>Where the blob with <paramref name="etag"/> lives.</summary>
    public string BlobPath(HubRepoId id, string etag) => Path.Combine(RepoDir(id), "blobs", etag);

    /// <summary>The commit the revision stands for in the cache: the revision itself when it is a sha, else its refs file; null when unknown.</summary>
    public string? CommitOf(HubRepoId id)
    {
        if (id.IsCommit) return id.Revision;
        var refFile = Path.Combine(RepoDir(id), "refs", id.Revision);
        if (!File.Exists(refFile) || new FileInfo(refFile).Length > 256) return null;
        string sha = File.ReadAllText(refFile).Trim();
        return HubRepoId.IsCommitSha(sha) ? sha : null;
    }

    /// <summary>Records that the revision (a branch or tag) points to <paramref name="commit"/>; a commit revision needs no ref.</summary>
    public void WriteRef(HubRepoId id, string commit)
    {
        if (id.IsCommit) return;
        var refFile = Path.Combine(RepoDir(id), "refs", id.Revision);
        Directory.CreateDirectory(Path.GetDirectoryName(refFile)!);
        var tmp = refFile + ".tmp-" + Guid.NewGuid().ToString("N");
        File.WriteAllText(tmp, commit);
        File.Move(tmp, refFile, overwrite: true);
    }

    /// <summary>The snapshot path of <paramref name="file"/> (checked by <see cref="RequireSafeFileName"/>).</summary>
    public string SnapshotFile(HubRepoId id, string commit, string file) =>
        Path.Combine([SnapshotDir(id, commit), .. RequireSafeFileName(file).Split('/')]);

    /// <summary>
    /// Puts <paramref name="file"/> into the snapshot as a relative symlink to its blob (as <c>huggingface_hub</c> does),
    /// replacing what was there; copies the blob where the file system refuses symlinks.
    /// </summary>
    public void Link(HubRepoId id, string commit, string file, string etag)
    {
        string blob = BlobPath(id, RequireSafeEtag(etag)), pointer = SnapshotFile(id, commit, file);
        string dir = Path.GetDirectoryName(pointer)!;
        Directory.CreateDirectory(dir);
        string tmp = pointer + ".tmp-" + Guid.NewGuid().ToString("N");
        try { File.CreateSymbolicLink(tmp, Path.GetRelativePath(dir, blob)); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or PlatformNotSupportedException) { File.Copy(blob, tmp); }
        File.Move(tmp, pointer, overwrite: true); // renames the link itself: a reader sees the old file or the new, never half
    }

    /// <summary>
    /// Throws unless <paramref name="file"/> is a relative path of plain segments (no <c>..</c>, <c>.</c>, empty segment,
    /// backslash, drive or control character): a file name from a server must stay inside the snapshot.
    /// </summary>
    public static string RequireSafeFileName(string file)
    {
        bool ok = file.Length is > 0 and <= 1024 && !file.Any(c => char.IsControl(c) || c is '\\' or ':')
            && file.Split('/').All(s => s.Length > 0 && s is not "." and not "..");
        return ok ? file : throw new HubIntegrityException($"the hub named a file '{Printable(file)}' that would land outside the snapshot folder; refused");
    }

    /// <summary>Throws unless <paramref name="etag"/> is a plain name (hex on the hub), so it cannot name a path.</summary>
    public static string RequireSafeEtag(string etag) => EtagPattern().IsMatch(etag)
        ? etag : throw new HubIntegrityException($"the hub sent an ETag '{Printable(etag)}' that is not a plain hash; refused");

    static string Printable(string s) => new([.. s.Take(120).Select(c => char.IsControl(c) ? '?' : c)]);
}
