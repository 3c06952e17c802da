namespace LoraKit.Registry;

/// <summary>
/// The registry database's tables. <c>versions</c> (name, version) holds one row per registered adapter content;
/// <c>files</c> maps its files to blobs; <c>evals</c> the reports attached to it; <c>aliases</c> where each alias points
/// now and <c>alias_history</c> every move in order (a rollback reads the last move's <c>previous</c>); <c>lineage</c> the run that
/// trained a version (<see cref="Lineage"/>; its parent is a name and version, not a foreign key, so deleting a parent
/// leaves the record readable); <c>runs</c> one row per training run directory (<see cref="RunLog"/>). Created if absent.
/// </summary>
internal static class RegistrySchema
{
    /// <summary>The format written to <c>meta</c>; a later layout change bumps it and migrates.</summary>
    public const int Version = 1;

    public const string Create = """
        CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '1');
        CREATE TABLE IF NOT EXISTS versions(
            name TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, created TEXT NOT NULL, note TEXT,
            base_fingerprint TEXT, base_model_type TEXT, base_model TEXT, config TEXT NOT NULL,
            PRIMARY KEY(name, version), UNIQUE(name, sha256));
        CREATE TABLE IF NOT EXISTS files(
            name TEXT NOT NULL, version INTEGER NOT NULL, file TEXT NOT NULL, blob TEXT NOT NULL, size INTEGER NOT NULL,
            PRIMARY KEY(name, version, file), FOREIGN KEY(name, version) REFERENCES versions(name, version));
        CREATE TABLE IF NOT EXISTS evals(
            id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL, blob TEXT NOT NULL,
            base_fingerprint TEXT, gate_passed INTEGER NOT NULL, detail TEXT NOT NULL, added TEXT NOT NULL,
            UNIQUE(name, version, blob), FOREIGN KEY(name, version) REFERENCES versions(name, version));
        CREATE TABLE IF NOT EXISTS aliases(
            name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY(name, alias),
            FOREIGN KEY(name, version) REFERENCES versions(name, version));
        CREATE TABLE IF NOT EXISTS alias_history(
            id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
            previous INTEGER, action TEXT NOT NULL, no_gate INTEGER NOT NULL, at TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS lineage(
            name TEXT NOT NULL, version INTEGER NOT NULL, run_dir TEXT NOT NULL, adapter_in_run TEXT NOT NULL,
            run_config TEXT NOT NULL, data TEXT NOT NULL, metrics TEXT NOT NULL, wall_seconds REAL,
            init_adapter_sha256 TEXT, init_adapter_ref TEXT, parent_name TEXT, parent_version INTEGER, added TEXT NOT NULL,
            PRIMARY KEY(name, version), FOREIGN KEY(name, version) REFERENCES versions(name, version));
        CREATE TABLE IF NOT EXISTS runs(
            id INTEGER PRIMARY KEY AUTOINCREMENT, output_dir TEXT NOT NULL UNIQUE, name TEXT NOT NULL, status TEXT NOT NULL,
            config TEXT NOT NULL, base_model TEXT, base_fingerprint TEXT, started TEXT NOT NULL, ended TEXT, device TEXT,
            resumes INTEGER NOT NULL DEFAULT 0, wall_seconds REAL, steps INTEGER, tokens INTEGER, tokens_per_s REAL,
            peak_memory_gib REAL, final_metrics TEXT, best_metrics TEXT, best_step INTEGER, data TEXT, cost REAL, error TEXT);
        """;
}
