namespace LoraKit.Hub;

/// <summary>
/// Brings a hub repository's needed files into the shared cache and returns the snapshot folder, which loads like any
/// local model or adapter directory. A file already in the snapshot is not fetched again, nor a blob another revision
/// already has; a commit-pinned revision whose snapshot is complete needs no network at all. Each file downloads into
/// <c>blobs/ETAG.incomplete</c> (resumed with a Range request next time), is checked (size; sha256 for LFS files), and
/// only then becomes <c>blobs/ETAG</c> and its snapshot symlink; the refs file is written last. A mismatch deletes the
/// partial file and leaves nothing that looks complete. Offline (HF_HUB_OFFLINE), or when the hub cannot be reached, a
/// complete cached snapshot of the revision is used, and its absence is a clear error.
/// </summary>
public static class HubDownloader
{
    /// <summary>
    /// The local folder <paramref name="value"/> stands for: itself when it exists on disk, else the snapshot of the hub
    /// id <c>ORG/NAME[@REVISION]</c> (downloaded as needed), else itself (so the caller reports the missing directory).
    /// </summary>
    public static string ResolveLocalOrHub(string value, HubFileSet files, HubSettings? settings = null)
    {
        if (Directory.Exists(value) || File.Exists(value)) return value;
        if (HubRepoId.TryParse(value) is not { } id) return value;
        try { return Download(id, files, settings ?? HubSettings.FromEnvironment()); }
        catch (HubException e) when (e is HubNotFoundException or HubAccessException or HubOfflineException)
        {
            // "models/qwen" may be a mistyped local folder as well as a hub id: say both.
            throw new HubNotFoundException($"'{value}' is not a local directory, nor found on the hub: {e.Message}");
        }
    }

    /// <summary>Downloads what <paramref name="files"/> needs of <paramref name="id"/> and returns the snapshot folder.</summary>
    public static string Download(HubRepoId id, HubFileSet files, HubSettings settings)
    {
        var cache = new HubCache(settings.CacheDir);
        string? cached = cache.CommitOf(id);
        string? cachedSnapshot = cached is null ? null : cache.SnapshotDir(id, cached);
        bool complete = cachedSnapshot is not null && files.IsCompleteIn(id, cachedSnapshot);
        if (settings.Offline)
            return complete ? cachedSnapshot!
                : throw new HubOfflineException($"{id}: not in the hub cache at {cache.Root} and HF_HUB_OFFLINE is set; download it once with the network " +
                    $"(lorakit download {id}), or unset HF_HUB_OFFLINE");
        if (complete && id.IsCommit) return cachedSnapshot!; // a commit never changes
        using var client = new HubClient(settings);
        HubRevision revision;
        try { revision = client.Revision(id); }
        catch (HubNetworkException e) when (complete)
        {
            Note(settings, id, $"{id}: the hub cannot be reached ({e.Message}); using the cached snapshot {cached![..12]}");
            return cachedSnapshot!;
        }
        string commit = revision.Sha, snapshot = cache.SnapshotDir(id, commit);
        var wanted = files.Pick(id, revision.Files);
        foreach (var file in wanted) Fetch(client, cache, id, commit, file, settings);
        var present = revision.Files.ToHashSet(StringComparer.Ordinal);
        foreach (var shard in HubFileSet.Shards(id, snapshot))
        {
            if (!present.Contains(shard)) throw new HubNotFoundException($"{id}: {HubFileSet.Index} names {shard}, which the repository does not have");
            Fetch(client, cache, id, commit, shard, settings);
        }
        cache.WriteRef(id, commit);
        return snapshot;
    }

    /// <summary>One file into the cache: skipped when the snapshot has it, linked when its blob is there, else downloaded and checked.</summary>
    static void Fetch(HubClient client, HubCache cache, HubRepoId id, string commit, string file, HubSettings settings)
    {
        if (File.Exists(cache.SnapshotFile(id, commit, file))) return;
        var info = client.Head(id, commit, file);
        string blob = cache.BlobPath(id, info.Etag);
        if (!File.Exists(blob))
        {
            Directory.CreateDirectory(Path.GetDirectoryName(blob)!);
            string partial = blob + ".incomplete";
            if (File.Exists(partial) && new FileInfo(partial).Length is > 0 and var have && have <= info.Size)
                Note(settings, id, $"{id}: {file}: resuming after {have} of {info.Size} bytes");
            client.Download(id, info, partial, bytes => settings.Progress?.Report(new HubProgress(id.Repo, file, bytes, info.Size)));
            Verify(id, info, partial);
            File.Move(partial, blob, overwrite: true);
        }
        cache.Link(id, commit, file, info.Etag);
    }

    /// <summary>An LFS file must hash to its etag (the sha256 the hub recorded); any file must have its announced size.</summary>
    static void Verify(HubRepoId id, HubFileInfo info, string partial)
    {
        long size = new FileInfo(partial).Length;
        string? problem = size != info.Size ? $"{size} bytes where the hub announced {info.Size}"
            : info.IsLfs && HubClient.Sha256(partial) is var sha && sha != info.Etag ? $"sha256 {sha} where the hub recorded {info.Etag}" : null;
        if (problem is null) return;
        File.Delete(partial); // a corrupt partial file would only be resumed into another failure
        throw new HubIntegrityException($"{id}: {info.File}: the download does not check out ({problem}); it was deleted, run again to fetch it anew");
    }

    static void Note(HubSettings settings, HubRepoId id, string line) => settings.Progress?.Report(new HubProgress(id.Repo, "", 0, 0, line));
}
