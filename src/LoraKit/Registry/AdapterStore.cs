using System.Text.Json.Nodes;
using LoraKit.Evaluation;
using LoraKit.Lora;
using Microsoft.Data.Sqlite;

namespace LoraKit.Registry;

/// <summary>
/// The adapter registry: named, numbered versions of PEFT adapters, stored by content, with aliases (production, staging,
/// …) that move between versions and keep their history, and evaluation reports attached to versions. It is a folder —
/// <c>registry.db</c> (SQLite in WAL mode with a busy timeout, so several processes use it at once; every write is one
/// transaction) and <c>blobs/sha256/…</c> (<see cref="BlobStore"/>) — with no server to run. Promotion requires a passed
/// gate attached to the version (or a recorded <c>noGate</c>); a missing or corrupted blob is an error naming the version.
/// A version added with the run that trained it carries that run's <see cref="Registry.Lineage"/> (config, data hashes,
/// metrics, parent version), which <see cref="Diff"/> compares.
/// All user-facing errors are one-line <see cref="LoraKitException"/>s.
/// </summary>
public sealed partial class AdapterStore : IDisposable
{
    /// <summary>The environment variable naming the registry folder when no path is given.</summary>
    public const string EnvVar = "LORAKIT_REGISTRY";
    /// <summary>The database file inside the registry folder.</summary>
    public const string DbFile = "registry.db";

    readonly SqliteConnection _db;
    readonly BlobStore _blobs;

    /// <summary>The registry folder.</summary>
    public string Root { get; }

    /// <summary>The open database, for the registry's other tables (<see cref="RunLog"/>): one connection, one set of pragmas.</summary>
    internal SqliteConnection Connection => _db;

    AdapterStore(string root, SqliteConnection db)
    {
        Root = root;
        _db = db;
        _blobs = new BlobStore(root);
    }

    /// <summary>The folder a registry opens when no path is given: <c>LORAKIT_REGISTRY</c>, else <c>~/.lorakit/registry/</c>.</summary>
    public static string DefaultPath() =>
        Environment.GetEnvironmentVariable(EnvVar) is { Length: > 0 } env ? env
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".lorakit", "registry");

    /// <summary>Opens (creating if needed) the registry at <paramref name="path"/>, else <see cref="DefaultPath"/>.</summary>
    public static AdapterStore Open(string? path = null)
    {
        string root = Path.GetFullPath(path ?? DefaultPath());
        if (File.Exists(root)) throw new LoraKitException($"registry: '{root}' is a file; give a folder");
        Directory.CreateDirectory(root);
        var db = new SqliteConnection(new SqliteConnectionStringBuilder { DataSource = Path.Combine(root, DbFile), DefaultTimeout = 30, Pooling = false }.ToString());
        try
        {
            db.Open();
            Exec(db, null, "PRAGMA busy_timeout = 10000;");
            Exec(db, null, "PRAGMA journal_mode = WAL;");
            Exec(db, null, "PRAGMA foreign_keys = ON;");
            using var tx = db.BeginTransaction();
            Exec(db, tx, RegistrySchema.Create);
            tx.Commit();
            RefuseNewerSchema(db, root);
        }
        catch (SqliteException e)
        {
            db.Dispose();
            throw new LoraKitException($"registry: {Path.Combine(root, DbFile)}: {e.Message.ReplaceLineEndings(" ")}");
        }
        return new AdapterStore(root, db);
    }

    /// <summary>
    /// A registry written by a later LoraKit (a higher <c>meta.schema</c>) may keep things this one does not know about:
    /// writing to it could lose them, so it is refused with the version to upgrade to rather than opened.
    /// </summary>
    static void RefuseNewerSchema(SqliteConnection db, string root)
    {
        using var cmd = db.CreateCommand();
        cmd.CommandText = "SELECT value FROM meta WHERE key='schema'";
        if (cmd.ExecuteScalar() is string v && int.TryParse(v, out int found) && found > RegistrySchema.Version)
        {
            db.Dispose();
            throw new LoraKitException($"registry: {Path.Combine(root, DbFile)} has schema {found}, made by a newer LoraKit; this one reads schema {RegistrySchema.Version} (upgrade LoraKit)");
        }
    }

    /// <summary>
    /// Adds the adapter in <paramref name="adapterDir"/> as the next version of <paramref name="name"/> and returns it; the
    /// same content already under this name returns that version instead (and attaches the eval report, if new).
    /// With <paramref name="runDir"/>, the run that trained it (a <c>lorakit train</c> output directory that wrote this
    /// adapter, see <see cref="RunLineage"/>) is recorded as the version's <see cref="Lineage"/>, its parent being the
    /// registered version holding the content the run started from (the ref the run recorded when it holds that content,
    /// else any name's version with that sha256). A version keeps the first lineage recorded for it: adding the same
    /// content again with a run fills the lineage only when the version has none.
    /// </summary>
    public AdapterVersion Add(string name, string adapterDir, string? note = null, string? evalReportPath = null, string? runDir = null)
    {
        RegistryRef.CheckName(name);
        string sha = AdapterDigest.Compute(adapterDir); // also checks the folder is an adapter
        var run = runDir is null ? null : RunLineage.Read(runDir, adapterDir, sha); // before the transaction: a bad run adds nothing
        var (fingerprint, modelType) = ReadBase(adapterDir);
        string config = File.ReadAllText(Path.Combine(adapterDir, AdapterFiles.ConfigFile));
        string? baseModel = JsonNode.Parse(config, documentOptions: IO.JsonFiles.Options) is JsonObject o && o["base_model_name_or_path"] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
        var eval = evalReportPath is null ? default : ReadEval(evalReportPath, sha, fingerprint);

        using var tx = _db.BeginTransaction(); // IMMEDIATE: one writer at a time, the busy timeout waits for the other
        int version = Scalar<long?>(tx, "SELECT version FROM versions WHERE name=$n AND sha256=$s", ("$n", name), ("$s", sha)) is long existing
            ? (int)existing : 0;
        if (version != 0)
            foreach (var f in AdapterDigest.Files.Select(f => Path.Combine(adapterDir, f)).Where(File.Exists))
                _blobs.Put(f); // same content: restores a blob that went missing or was corrupted (a no-op when intact)
        if (version == 0)
        {
            version = HighestEverVersion(tx, name) + 1;
            Exec(_db, tx, "INSERT INTO versions(name, version, sha256, created, note, base_fingerprint, base_model_type, base_model, config) VALUES ($n,$v,$s,$c,$note,$fp,$mt,$bm,$cfg)",
                ("$n", name), ("$v", version), ("$s", sha), ("$c", Now()), ("$note", note), ("$fp", fingerprint), ("$mt", modelType), ("$bm", baseModel), ("$cfg", config));
            foreach (var f in AdapterDigest.Files)
            {
                var path = Path.Combine(adapterDir, f);
                if (!File.Exists(path)) continue;
                var (blob, size) = _blobs.Put(path); // inside the transaction: gc (also a writer) cannot remove it before the row exists
                Exec(_db, tx, "INSERT INTO files(name, version, file, blob, size) VALUES ($n,$v,$f,$b,$sz)", ("$n", name), ("$v", version), ("$f", f), ("$b", blob), ("$sz", size));
            }
        }
        if (evalReportPath is not null)
        {
            var (blob, _) = _blobs.Put(GateCheck.ReportFile(evalReportPath));
            Exec(_db, tx, "INSERT OR IGNORE INTO evals(name, version, blob, base_fingerprint, gate_passed, detail, added) VALUES ($n,$v,$b,$fp,$p,$d,$a)",
                ("$n", name), ("$v", version), ("$b", blob), ("$fp", eval.Base), ("$p", eval.Passed ? 1 : 0), ("$d", eval.Detail), ("$a", Now()));
        }
        if (run is not null) AddLineage(tx, name, version, run);
        tx.Commit();
        return Get(name, version) ?? throw new InvalidOperationException("registry: version vanished after insert");
    }

    /// <summary>Every version, of one name or of all, ordered by name and version.</summary>
    public IReadOnlyList<AdapterVersion> List(string? name = null)
    {
        if (name is not null) RegistryRef.CheckName(name);
        return Versions(null, name is null ? "" : "WHERE name=$n", name is null ? [] : [("$n", name)]);
    }

    /// <summary>The version <paramref name="reference"/> names (see <see cref="RegistryRef"/>); unknown is an error.</summary>
    public AdapterVersion Resolve(string reference)
    {
        var r = RegistryRef.Parse(reference);
        int? version = r.Version;
        if (r.Alias is { } alias)
            version = AliasTarget(null, r.Name, alias) ?? throw new LoraKitException($"registry: {r.Name} has no alias '{alias}'{AliasHint(null, r.Name)}");
        else if (version is null)
            version = AliasTarget(null, r.Name, RegistryRef.DefaultAlias)
                      ?? (int?)Scalar<long?>(null, "SELECT MAX(version) FROM versions WHERE name=$n", ("$n", r.Name));
        return (version is { } v ? Get(r.Name, v) : null)
               ?? throw new LoraKitException($"registry: no adapter {(version is { } w ? $"{r.Name}@{w}" : r.Name)} in {Root}");
    }

    /// <summary>Versions, current aliases, alias history and evaluations of the name in <paramref name="reference"/>.</summary>
    public AdapterDetails Show(string reference)
    {
        var r = RegistryRef.Parse(reference);
        if (r.Version is not null || r.Alias is not null) Resolve(reference); // a ref that does not resolve is an error
        var versions = List(r.Name);
        if (versions.Count == 0) throw new LoraKitException($"registry: no adapter named {r.Name} in {Root}");
        var aliases = new Dictionary<string, int>();
        using (var cmd = Command(null, "SELECT alias, version FROM aliases WHERE name=$n ORDER BY alias", ("$n", r.Name)))
        using (var rd = cmd.ExecuteReader()) while (rd.Read()) aliases[rd.GetString(0)] = rd.GetInt32(1);
        var history = new List<AliasMove>();
        using (var cmd = Command(null, "SELECT id, alias, version, previous, action, no_gate, at FROM alias_history WHERE name=$n ORDER BY id", ("$n", r.Name)))
        using (var rd = cmd.ExecuteReader())
            while (rd.Read()) history.Add(new(rd.GetInt64(0), rd.GetString(1), rd.GetInt32(2), rd.IsDBNull(3) ? null : rd.GetInt32(3), rd.GetString(4), rd.GetInt32(5) != 0, rd.GetString(6)));
        return new(r.Name, versions, aliases, history, Evals(r.Name, null)) { Lineage = LineageOf(r.Name, null) };
    }

    /// <summary>Evaluations attached to a name (and version, if given).</summary>
    public IReadOnlyList<EvalRecord> Evals(string name, int? version)
    {
        var list = new List<EvalRecord>();
        using var cmd = Command(null, "SELECT version, blob, base_fingerprint, gate_passed, detail, added FROM evals WHERE name=$n AND ($v IS NULL OR version=$v) ORDER BY id",
            ("$n", name), ("$v", version));
        using var rd = cmd.ExecuteReader();
        while (rd.Read()) list.Add(new(rd.GetInt32(0), rd.GetString(1), rd.IsDBNull(2) ? null : rd.GetString(2), rd.GetInt32(3) != 0, rd.GetString(4), rd.GetString(5)));
        return list;
    }

    /// <summary>
    /// Points <paramref name="alias"/> of the name at the version <paramref name="reference"/> names. Refused unless that
    /// version has an attached passed gate on <paramref name="baseFingerprint"/> (default: the base the adapter records; an
    /// adapter recording none accepts a passed gate on any base), or <paramref name="noGate"/>, which is recorded.
    /// </summary>
    public AliasMove Promote(string reference, string alias, bool noGate = false, string? baseFingerprint = null)
    {
        RegistryRef.CheckAlias(alias);
        var target = Resolve(reference);
        string? required = baseFingerprint ?? target.BaseFingerprint;
        if (!noGate)
        {
            var evals = Evals(target.Name, target.Version);
            if (!evals.Any(e => e.GatePassed && (required is null || e.BaseFingerprint == required)))
                throw new GateException($"registry: {target.Ref} has no passed gate{(required is null ? "" : $" on base {Models.BaseFingerprint.Short(required)}")} attached " +
                    $"({(evals.Count == 0 ? "no evaluation attached" : RegistryRef.Clip(evals[^1].Detail))}); attach one with `lorakit registry add {target.Name} DIR --eval eval.json` or promote with --no-gate");
        }
        using var tx = _db.BeginTransaction();
        // The checks above ran before the write lock: a delete from another process may have come in between.
        if (Scalar<string>(tx, "SELECT sha256 FROM versions WHERE name=$n AND version=$v", ("$n", target.Name), ("$v", target.Version)) != target.Sha256)
            throw new LoraKitException($"registry: {target.Ref} was deleted while it was being promoted; nothing was changed");
        var move = Move(tx, target.Name, alias, target.Version, "promote", noGate);
        tx.Commit();
        return move;
    }

    /// <summary>
    /// Returns <paramref name="alias"/> to the version it pointed to before its last move (a rollback is itself a move, so
    /// rolling back a rollback restores the rolled-back version).
    /// </summary>
    public AliasMove Rollback(string name, string alias)
    {
        RegistryRef.CheckName(name);
        RegistryRef.CheckAlias(alias);
        using var tx = _db.BeginTransaction();
        int? previous = null;
        bool any = false;
        using (var cmd = Command(tx, "SELECT previous FROM alias_history WHERE name=$n AND alias=$a ORDER BY id DESC LIMIT 1", ("$n", name), ("$a", alias)))
        using (var rd = cmd.ExecuteReader())
            if (rd.Read()) { any = true; previous = rd.IsDBNull(0) ? null : rd.GetInt32(0); }
        if (!any) throw new LoraKitException($"registry: {name} has no alias '{alias}' to roll back{AliasHint(tx, name)}");
        if (previous is not { } p) throw new LoraKitException($"registry: {name}@{alias} has no previous version to roll back to (it was first set to v{AliasTarget(tx, name, alias)})");
        if (Scalar<long?>(tx, "SELECT version FROM versions WHERE name=$n AND version=$v", ("$n", name), ("$v", p)) is null)
            throw new LoraKitException($"registry: {name}@{alias} previously pointed to {name}@{p}, which has been deleted");
        var move = Move(tx, name, alias, p, "rollback", false);
        tx.Commit();
        return move;
    }

    /// <summary>
    /// Writes the version <paramref name="reference"/> names to <paramref name="dir"/> as a plain PEFT adapter folder (must
    /// not exist or be empty), checking every blob's bytes and the whole adapter's content hash as it goes; a failed export leaves
    /// none of its files behind (and removes the folder when it created it).
    /// </summary>
    public AdapterVersion Export(string reference, string dir)
    {
        var v = Resolve(reference);
        if (File.Exists(dir) || (Directory.Exists(dir) && Directory.EnumerateFileSystemEntries(dir).Any()))
            throw new LoraKitException($"registry: export folder '{dir}' exists and is not empty");
        bool created = !Directory.Exists(dir);
        Directory.CreateDirectory(dir);
        var written = new List<string>();
        try
        {
            foreach (var f in v.Files)
            {
                var dest = Path.Combine(dir, f.File);
                written.Add(dest);
                _blobs.CopyTo(f.Blob, dest, v.Ref);
            }
            if (AdapterDigest.Compute(dir) != v.Sha256)
                throw new LoraKitException($"registry: {v.Ref}: the exported files do not hash to the recorded sha256 {v.Sha256[..12]} (the registry is damaged)");
        }
        catch
        {
            // Half an adapter is worse than none (a loader might take it): remove what this export wrote, and the folder if it made it.
            foreach (var w in written) File.Delete(w);
            if (created && !Directory.EnumerateFileSystemEntries(dir).Any()) Directory.Delete(dir);
            throw;
        }
        return v;
    }

    /// <summary>Where <see cref="Checkout"/> keeps verified copies, one folder per content hash.</summary>
    public const string CheckoutDir = "checkout";

    /// <summary>
    /// A plain PEFT folder holding the version <paramref name="reference"/> names, for commands that take an adapter
    /// directory: <c>checkout/&lt;sha256&gt;/</c> inside the registry, exported (and verified) on first use, reused while its
    /// files still hash to the version's sha256, exported again when they do not. Only this registry's own checkout
    /// folders are ever replaced.
    /// </summary>
    public (AdapterVersion Version, string Dir) Checkout(string reference)
    {
        var v = Resolve(reference);
        var dir = Path.Combine(Root, CheckoutDir, v.Sha256);
        if (Directory.Exists(dir))
        {
            try { if (AdapterDigest.Compute(dir) == v.Sha256) return (v, dir); }
            catch (LoraKitException) { } // damaged: export it again
            Directory.Delete(dir, recursive: true);
        }
        // Unique per call: two stores in one process checking out the same version must not share (and delete) one folder.
        var tmp = Path.Combine(Root, CheckoutDir, $".{v.Sha256}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        Export(v.Ref, tmp); // the version resolved above, not the reference again: an alias moved meanwhile must not fill this sha256's folder
        try { Directory.Move(tmp, dir); }
        catch (IOException) when (Directory.Exists(dir)) { Directory.Delete(tmp, recursive: true); } // another process checked it out first
        return (v, dir);
    }

    /// <summary>Deletes one version (its blobs stay until <see cref="Gc"/>; its number is never given again); refused while an alias points to it.</summary>
    public void Delete(string reference)
    {
        var r = RegistryRef.Parse(reference);
        if (r.Version is null) throw new LoraKitException($"registry: delete takes NAME@VERSION (a number), not '{RegistryRef.Clip(reference)}'");
        using var tx = _db.BeginTransaction();
        if (Scalar<long?>(tx, "SELECT version FROM versions WHERE name=$n AND version=$v", ("$n", r.Name), ("$v", r.Version)) is null)
            throw new LoraKitException($"registry: no adapter {r} in {Root}");
        var holders = new List<string>();
        using (var cmd = Command(tx, "SELECT alias FROM aliases WHERE name=$n AND version=$v ORDER BY alias", ("$n", r.Name), ("$v", r.Version)))
        using (var rd = cmd.ExecuteReader()) while (rd.Read()) holders.Add(rd.GetString(0));
        if (holders.Count > 0)
            throw new LoraKitException($"registry: {r} is aliased as {string.Join(", ", holders)}; promote another version or roll the alias back first");
        foreach (var table in new[] { "files", "evals", "lineage", "versions" })
            Exec(_db, tx, $"DELETE FROM {table} WHERE name=$n AND version=$v", ("$n", r.Name), ("$v", r.Version));
        Exec(_db, tx, "INSERT INTO meta(key, value) VALUES ($k, $v) ON CONFLICT(key) DO UPDATE SET value = MAX(CAST(value AS INTEGER), excluded.value)",
            ("$k", DeletedKey(r.Name)), ("$v", r.Version));
        tx.Commit();
    }

    /// <summary>
    /// The highest version number <paramref name="name"/> ever had: its versions, the deleted ones (kept in <c>meta</c>) and
    /// those its alias history names (registries from before that record). A number is never given twice: NAME@3, an alias's
    /// rollback target and the records outside the registry that name it keep meaning the content that was added as 3.
    /// </summary>
    int HighestEverVersion(SqliteTransaction tx, string name) => (int)(Scalar<long?>(tx, """
        SELECT MAX(v) FROM (
            SELECT MAX(version) AS v FROM versions WHERE name=$n
            UNION ALL SELECT CAST(value AS INTEGER) FROM meta WHERE key=$k
            UNION ALL SELECT MAX(version) FROM alias_history WHERE name=$n
            UNION ALL SELECT MAX(previous) FROM alias_history WHERE name=$n)
        """, ("$n", name), ("$k", DeletedKey(name))) ?? 0);

    static string DeletedKey(string name) => $"deleted_max_version:{name}";

    /// <summary>Removes blobs no version or evaluation refers to; returns how many and their total bytes.</summary>
    public (int Blobs, long Bytes) Gc()
    {
        using var tx = _db.BeginTransaction(); // holds the write lock: no add can be storing a blob meanwhile
        var live = new HashSet<string>();
        using (var cmd = Command(tx, "SELECT blob FROM files UNION SELECT blob FROM evals"))
        using (var rd = cmd.ExecuteReader()) while (rd.Read()) live.Add(rd.GetString(0));
        int count = 0;
        long bytes = 0;
        foreach (var blob in _blobs.All().Where(b => !live.Contains(b)).ToList())
        {
            var path = _blobs.PathOf(blob);
            bytes += new FileInfo(path).Length;
            File.Delete(path);
            count++;
        }
        tx.Commit();
        return (count, bytes);
    }

    /// <summary>Closes the database.</summary>
    public void Dispose() => _db.Dispose();

    AliasMove Move(SqliteTransaction tx, string name, string alias, int version, string action, bool noGate)
    {
        int? previous = AliasTarget(tx, name, alias);
        string at = Now();
        Exec(_db, tx, "INSERT INTO aliases(name, alias, version) VALUES ($n,$a,$v) ON CONFLICT(name, alias) DO UPDATE SET version=$v", ("$n", name), ("$a", alias), ("$v", version));
        Exec(_db, tx, "INSERT INTO alias_history(name, alias, version, previous, action, no_gate, at) VALUES ($n,$a,$v,$p,$act,$ng,$at)",
            ("$n", name), ("$a", alias), ("$v", version), ("$p", previous), ("$act", action), ("$ng", noGate ? 1 : 0), ("$at", at));
        long id = Scalar<long?>(tx, "SELECT last_insert_rowid()") ?? 0;
        return new(id, alias, version, previous, action, noGate, at);
    }

    int? AliasTarget(SqliteTransaction? tx, string name, string alias) =>
        (int?)Scalar<long?>(tx, "SELECT version FROM aliases WHERE name=$n AND alias=$a", ("$n", name), ("$a", alias));

    string AliasHint(SqliteTransaction? tx, string name)
    {
        var names = new List<string>();
        using (var cmd = Command(tx, "SELECT alias FROM aliases WHERE name=$n ORDER BY alias", ("$n", name)))
        using (var rd = cmd.ExecuteReader()) while (rd.Read()) names.Add(rd.GetString(0));
        return names.Count == 0 ? "" : $" (it has {string.Join(", ", names)})";
    }

    AdapterVersion? Get(string name, int version) =>
        Versions(null, "WHERE name=$n AND version=$v", [("$n", name), ("$v", version)]).FirstOrDefault();

    List<AdapterVersion> Versions(SqliteTransaction? tx, string where, (string, object?)[] args)
    {
        var rows = new List<AdapterVersion>();
        using (var cmd = Command(tx, $"SELECT name, version, sha256, created, note, base_fingerprint, base_model_type, base_model, config FROM versions {where} ORDER BY name, version", args))
        using (var rd = cmd.ExecuteReader())
            while (rd.Read())
                rows.Add(new(rd.GetString(0), rd.GetInt32(1), rd.GetString(2), rd.GetString(3), Opt(rd, 4), Opt(rd, 5), Opt(rd, 6), Opt(rd, 7), rd.GetString(8), []));
        for (int i = 0; i < rows.Count; i++)
        {
            var files = new List<StoredFile>();
            using var cmd = Command(tx, "SELECT file, blob, size FROM files WHERE name=$n AND version=$v ORDER BY file", ("$n", rows[i].Name), ("$v", rows[i].Version));
            using var rd = cmd.ExecuteReader();
            while (rd.Read()) files.Add(new(rd.GetString(0), rd.GetString(1), rd.GetInt64(2)));
            rows[i] = rows[i] with { Files = files };
        }
        return rows;
    }

    /// <summary>The base LoraKit recorded in the adapter's safetensors metadata (null, null for PEFT's adapters).</summary>
    static (string? Fingerprint, string? ModelType) ReadBase(string dir)
    {
        using var file = IO.SafetensorsFile.Open(Path.Combine(dir, AdapterFiles.WeightsFile));
        return (file.Metadata.GetValueOrDefault(Models.BaseFingerprint.MetadataKey), file.Metadata.GetValueOrDefault(Models.BaseFingerprint.ModelTypeKey));
    }

    /// <summary>
    /// Reads an eval report's base and checks it for a passed gate for this adapter (<see cref="GateCheck.Require"/>). A
    /// failed gate is recorded (with why); a file that is not an eval report at all is an error.
    /// </summary>
    static (string? Base, bool Passed, string Detail) ReadEval(string path, string sha, string? adapterBase)
    {
        string file;
        string reportBase;
        try { (file, _, reportBase) = GateCheck.Read(path); }
        catch (GateException e) { throw new LoraKitException($"registry: {e.Message}"); }
        if (adapterBase is not null && adapterBase != reportBase)
            return (reportBase, false, $"made on another base ({Models.BaseFingerprint.Short(reportBase)}) than the adapter's ({Models.BaseFingerprint.Short(adapterBase)})");
        try
        {
            var evidence = GateCheck.Require(file, sha, reportBase);
            return (reportBase, true, $"gate passed ({evidence.Timestamp})");
        }
        catch (GateException e) { return (reportBase, false, e.Message); }
    }

    static string? Opt(SqliteDataReader rd, int i) => rd.IsDBNull(i) ? null : rd.GetString(i);
    static string Now() => DateTimeOffset.UtcNow.ToString("yyyy-MM-ddTHH:mm:ss.fffZ", System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>A parameterized statement on this registry's connection (also <see cref="RunLog"/>'s: one set of helpers).</summary>
    internal SqliteCommand Command(SqliteTransaction? tx, string sql, params (string, object?)[] args)
    {
        var cmd = _db.CreateCommand();
        cmd.CommandText = sql;
        cmd.Transaction = tx;
        foreach (var (k, v) in args) cmd.Parameters.AddWithValue(k, v ?? DBNull.Value);
        return cmd;
    }

    /// <summary>The first column of the first row, or default when there is none or it is NULL.</summary>
    internal T? Scalar<T>(SqliteTransaction? tx, string sql, params (string, object?)[] args)
    {
        using var cmd = Command(tx, sql, args);
        var value = cmd.ExecuteScalar();
        return value is null or DBNull ? default : (T)Convert.ChangeType(value, Nullable.GetUnderlyingType(typeof(T)) ?? typeof(T), System.Globalization.CultureInfo.InvariantCulture);
    }

    static void Exec(SqliteConnection db, SqliteTransaction? tx, string sql, params (string, object?)[] args)
    {
        using var cmd = db.CreateCommand();
        cmd.CommandText = sql;
        cmd.Transaction = tx;
        foreach (var (k, v) in args) cmd.Parameters.AddWithValue(k, v ?? DBNull.Value);
        cmd.ExecuteNonQuery();
    }
}
