using Microsoft.Data.Sqlite;

namespace LoraKit.Registry;

/// <summary>One registered version as a long-running reader needs it: no files, no evaluations (cheap to read per request).</summary>
/// <param name="Config">The adapter_config.json text (its <c>task_type</c> tells a classifier from a generator).</param>
/// <param name="Created">When it was added (ISO 8601, UTC).</param>
public sealed record RegistryEntry(string Name, int Version, string Sha256, string? BaseFingerprint, string? BaseModel, string Config, string Created)
{
    /// <summary>"NAME@VERSION".</summary>
    public string Ref => $"{Name}@{Version}";
}

/// <summary>Where one alias of one name points now.</summary>
public sealed record AliasEntry(string Name, string Alias, int Version);

/// <summary>
/// A read view of a registry for processes that read it for a long time while others write (the server): its own SQLite
/// connection (query-only, busy timeout) that never creates a registry, never takes the write lock, and sees every commit
/// at its next statement (WAL: readers never wait for a writer). Thread-safe: statements are serialized on one lock and
/// each is a single indexed lookup. <see cref="Checkout"/> goes through <see cref="AdapterStore.Checkout"/> (verified blobs).
/// </summary>
public sealed class RegistryReader : IDisposable
{
    readonly SqliteConnection _db;
    readonly object _gate = new();
    AdapterStore? _store; // opened on the first checkout (its Open takes the write lock once: schema check); a failed open is retried next time
    readonly object _storeGate = new();

    /// <summary>The registry folder.</summary>
    public string Root { get; }

    RegistryReader(string root, SqliteConnection db)
    {
        Root = root;
        _db = db;
    }

    /// <summary>Opens the registry at <paramref name="path"/>; a folder without <c>registry.db</c> is an error (a typo never creates one).</summary>
    public static RegistryReader Open(string path)
    {
        string root = Path.GetFullPath(path);
        string file = Path.Combine(root, AdapterStore.DbFile);
        if (!File.Exists(file)) throw new LoraKitException($"registry: no registry at {root} ({AdapterStore.DbFile} not found); create one with `lorakit registry add`");
        var db = new SqliteConnection(new SqliteConnectionStringBuilder { DataSource = file, Mode = SqliteOpenMode.ReadWrite, DefaultTimeout = 10, Pooling = false }.ToString());
        try
        {
            db.Open();
            using var cmd = db.CreateCommand();
            cmd.CommandText = "PRAGMA busy_timeout = 10000; PRAGMA query_only = ON;";
            cmd.ExecuteNonQuery();
            // The pragmas above never read the file: read the tables a server needs now, so a file that is not a registry
            // (not SQLite, damaged, no versions table) is this one-line error at startup, not a failure on every request.
            cmd.CommandText = "SELECT 1 FROM versions LIMIT 1; SELECT 1 FROM aliases LIMIT 1;";
            cmd.ExecuteNonQuery();
        }
        catch (SqliteException e)
        {
            db.Dispose();
            throw new LoraKitException($"registry: {file}: {e.Message.ReplaceLineEndings(" ")}");
        }
        return new RegistryReader(root, db);
    }

    /// <summary>Whether any version of <paramref name="name"/> is registered.</summary>
    public bool HasName(string name) => Query("SELECT 1 FROM versions WHERE name=$n LIMIT 1", _ => true, ("$n", name)).Count > 0;

    /// <summary>The version <paramref name="version"/> of <paramref name="name"/>, or null.</summary>
    public RegistryEntry? Find(string name, int version) =>
        Query($"{EntrySelect} WHERE name=$n AND version=$v", ReadEntry, ("$n", name), ("$v", version)).FirstOrDefault();

    /// <summary>The version <paramref name="alias"/> of <paramref name="name"/> points to now, or null.</summary>
    public RegistryEntry? FindAlias(string name, string alias) =>
        Query($"{EntrySelect} WHERE (name, version) IN (SELECT name, version FROM aliases WHERE name=$n AND alias=$a)", ReadEntry, ("$n", name), ("$a", alias)).FirstOrDefault();

    /// <summary>The aliases of <paramref name="name"/> (all names when null), at most <paramref name="limit"/>, by name and alias.</summary>
    public IReadOnlyList<AliasEntry> Aliases(string? name = null, int limit = 1000) =>
        Query("SELECT name, alias, version FROM aliases WHERE ($n IS NULL OR name=$n) ORDER BY name, alias LIMIT $l",
            rd => new AliasEntry(rd.GetString(0), rd.GetString(1), rd.GetInt32(2)), ("$n", name), ("$l", limit));

    /// <summary>How many versions <paramref name="name"/> has, and its lowest and highest version numbers.</summary>
    public (int Count, int Lowest, int Highest) VersionRange(string name) =>
        Query("SELECT COUNT(*), IFNULL(MIN(version), 0), IFNULL(MAX(version), 0) FROM versions WHERE name=$n",
            rd => (rd.GetInt32(0), rd.GetInt32(1), rd.GetInt32(2)), ("$n", name))[0];

    /// <summary>
    /// The versions worth listing: every version an alias points to, and the <paramref name="newest"/> newest of each name;
    /// at most <paramref name="limit"/> rows (by name, then version), so a registry with thousands of versions stays cheap.
    /// </summary>
    public IReadOnlyList<RegistryEntry> Listed(int newest, int limit) =>
        Query($"""
            {EntrySelect} WHERE (name, version) IN (SELECT name, version FROM aliases)
               OR (name, version) IN (SELECT name, version FROM (SELECT name, version, ROW_NUMBER() OVER (PARTITION BY name ORDER BY version DESC) AS k FROM versions) WHERE k <= $k)
            ORDER BY name, version LIMIT $l
            """, ReadEntry, ("$k", newest), ("$l", limit));

    /// <summary>
    /// The lineage parent ("NAME@VERSION") of each of <paramref name="entries"/> that has one (<c>registry add --run</c> of a
    /// run started from a registered adapter). Empty for a registry made before lineage was recorded (no such table: this
    /// reader never changes the schema).
    /// </summary>
    public IReadOnlyDictionary<string, string> Parents(IReadOnlyCollection<RegistryEntry> entries)
    {
        var parents = new Dictionary<string, string>();
        if (entries.Count == 0 || Query("SELECT 1 FROM sqlite_master WHERE type='table' AND name='lineage'", _ => true).Count == 0) return parents;
        var wanted = entries.Select(e => e.Ref).ToHashSet();
        foreach (var (child, parent) in Query("SELECT name, version, parent_name, parent_version FROM lineage WHERE parent_name IS NOT NULL AND parent_version IS NOT NULL",
                     rd => ($"{rd.GetString(0)}@{rd.GetInt32(1)}", $"{rd.GetString(2)}@{rd.GetInt32(3)}")))
            if (wanted.Contains(child)) parents[child] = parent;
        return parents;
    }

    /// <summary>
    /// A verified plain PEFT folder holding <paramref name="entry"/> (<see cref="AdapterStore.Checkout"/>). Its content must
    /// still hash to <paramref name="entry"/>'s sha256: a version deleted and re-added with other content under the same
    /// number is a <see cref="KeyNotFoundException"/>; a missing or damaged blob is the store's <see cref="LoraKitException"/>.
    /// </summary>
    public string Checkout(RegistryEntry entry)
    {
        lock (_storeGate)
        {
            _store ??= AdapterStore.Open(Root);
            var (v, dir) = _store.Checkout(entry.Ref);
            if (v.Sha256 != entry.Sha256) throw new KeyNotFoundException($"{entry.Ref} now holds other content (sha256 {v.Sha256[..12]}, not {entry.Sha256[..12]})");
            return dir;
        }
    }

    /// <summary>Closes the connections.</summary>
    public void Dispose()
    {
        lock (_gate) _db.Dispose();
        lock (_storeGate) _store?.Dispose();
    }

    const string EntrySelect = "SELECT name, version, sha256, base_fingerprint, base_model, config, created FROM versions";

    static RegistryEntry ReadEntry(SqliteDataReader rd) =>
        new(rd.GetString(0), rd.GetInt32(1), rd.GetString(2), rd.IsDBNull(3) ? null : rd.GetString(3), rd.IsDBNull(4) ? null : rd.GetString(4), rd.GetString(5), rd.GetString(6));

    List<T> Query<T>(string sql, Func<SqliteDataReader, T> read, params (string, object?)[] args)
    {
        lock (_gate)
        {
            using var cmd = _db.CreateCommand();
            cmd.CommandText = sql;
            foreach (var (k, v) in args) cmd.Parameters.AddWithValue(k, v ?? DBNull.Value);
            using var rd = cmd.ExecuteReader();
            var rows = new List<T>();
            while (rd.Read()) rows.Add(read(rd));
            return rows;
        }
    }
}
