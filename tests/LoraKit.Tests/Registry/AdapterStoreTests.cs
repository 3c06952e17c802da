using System.Text.Json.Nodes;
using LoraKit.Lora;
using LoraKit.Registry;
using Microsoft.Data.Sqlite;

namespace LoraKit.Tests.Registry;

/// <summary>
/// The registry on a real SQLite file in a temporary folder with the fixture adapters: add, dedupe, list, show, export
/// (byte-identical files), aliases and their history (rollback, rollback of a rollback), delete and gc, a corrupted or
/// missing blob, and reference parsing.
/// </summary>
public class AdapterStoreTests
{
    static readonly string A = Fixtures.Path_("adapters", "llama", "a"), B = Fixtures.Path_("adapters", "llama", "b");

    [Fact]
    public void OpensAWalDatabaseWithTheNativeSqlite()
    {
        var dir = Fixtures.TempDir();
        using (AdapterStore.Open(dir)) { }
        Assert.True(File.Exists(Path.Combine(dir, AdapterStore.DbFile)));
        using var db = new SqliteConnection($"Data Source={Path.Combine(dir, AdapterStore.DbFile)}");
        db.Open();
        using var cmd = db.CreateCommand();
        cmd.CommandText = "PRAGMA journal_mode;";
        Assert.Equal("wal", (string)cmd.ExecuteScalar()!);
    }

    [Fact]
    public void AddListShowExportRoundTripsAndDeduplicates()
    {
        var dir = Fixtures.TempDir();
        using var store = AdapterStore.Open(Path.Combine(dir, "reg"));
        var v1 = store.Add("demo", A, note: "first");
        var again = store.Add("demo", A);
        var v2 = store.Add("demo", B);
        var other = store.Add("other.name_1", A);
        Assert.Equal(1, v1.Version);
        Assert.Equal((v1.Version, v1.Sha256, v1.Created), (again.Version, again.Sha256, again.Created)); // identical content: the existing version
        Assert.Equal(2, v2.Version);
        Assert.Equal(1, other.Version);               // versions count per name
        Assert.Equal(AdapterDigest.Compute(A), v1.Sha256);
        Assert.Equal(AdapterDigest.Compute(B), v2.Sha256);
        Assert.Equal("first", v1.Note);
        Assert.Equal(File.ReadAllText(Path.Combine(A, AdapterFiles.ConfigFile)), v1.Config);
        Assert.Equal(JsonNode.Parse(v1.Config)!["base_model_name_or_path"]?.GetValue<string>(), v1.BaseModel);

        Assert.Equal(["demo@1", "demo@2", "other.name_1@1"], store.List().Select(v => v.Ref));
        Assert.Equal(["demo@1", "demo@2"], store.List("demo").Select(v => v.Ref));
        Assert.Equal(2, store.Resolve("demo").Version);      // no production alias: the latest
        Assert.Equal(1, store.Resolve("demo@1").Version);
        var details = store.Show("demo");
        Assert.Equal(2, details.Versions.Count);
        Assert.Empty(details.Aliases);

        foreach (var (reference, source) in new[] { ("demo@1", A), ("demo@2", B) })
        {
            var outDir = Path.Combine(dir, "export-" + reference.Replace('@', '-'));
            store.Export(reference, outDir);
            var sourceFiles = Directory.GetFiles(source).Select(Path.GetFileName).Where(f => f is AdapterFiles.ConfigFile or AdapterFiles.WeightsFile or AdapterFiles.LabelsFile).Order().ToList();
            Assert.Equal(sourceFiles, Directory.GetFiles(outDir).Select(Path.GetFileName).Order().ToList());
            foreach (var f in sourceFiles) Assert.Equal(File.ReadAllBytes(Path.Combine(source, f!)), File.ReadAllBytes(Path.Combine(outDir, f!)));
        }
        // Stored once: the two names share A's blobs.
        Assert.Equal(v1.Files.Select(f => f.Blob), other.Files.Select(f => f.Blob));
        var ex = Assert.Throws<LoraKitException>(() => store.Export("demo@1", Path.Combine(dir, "export-demo-1")));
        Assert.Contains("not empty", ex.Message);
    }

    [Fact]
    public void AliasesMoveAndRollBackWithTheirHistory()
    {
        using var store = AdapterStore.Open(Fixtures.TempDir());
        store.Add("demo", A);
        store.Add("demo", B);
        Assert.Contains("no alias 'production' to roll back", Assert.Throws<LoraKitException>(() => store.Rollback("demo", "production")).Message);
        store.Promote("demo@1", "production", noGate: true);
        Assert.Equal(1, store.Resolve("demo").Version);     // a plain name means @production when it exists
        Assert.Contains("no previous version", Assert.Throws<LoraKitException>(() => store.Rollback("demo", "production")).Message);
        store.Promote("demo@2", "production", noGate: true);
        Assert.Equal(2, store.Resolve("demo@production").Version);
        Assert.Equal(1, store.Rollback("demo", "production").Version);
        Assert.Equal(1, store.Resolve("demo@production").Version);
        Assert.Equal(2, store.Rollback("demo", "production").Version);   // rollback of a rollback
        Assert.Equal(2, store.Resolve("demo").Version);
        var h = store.Show("demo@production").History;
        Assert.Equal(["promote", "promote", "rollback", "rollback"], h.Select(m => m.Action));
        Assert.Equal([1, 2, 1, 2], h.Select(m => m.Version));
        Assert.Equal([null, 1, 2, 1], h.Select(m => m.Previous));
        Assert.All(h.Take(2), m => Assert.True(m.NoGate));
        Assert.Contains("has no alias 'staging'", Assert.Throws<LoraKitException>(() => store.Resolve("demo@staging")).Message);
    }

    [Fact]
    public void DeleteIsRefusedWhileAliasedAndGcFreesTheFiles()
    {
        var dir = Fixtures.TempDir();
        using var store = AdapterStore.Open(dir);
        var v1 = store.Add("demo", A);
        store.Add("demo", B);
        store.Promote("demo@1", "production", noGate: true);
        Assert.Contains("aliased as production", Assert.Throws<LoraKitException>(() => store.Delete("demo@1")).Message);
        Assert.Contains("NAME@VERSION", Assert.Throws<LoraKitException>(() => store.Delete("demo")).Message);
        Assert.Equal((0, 0L), store.Gc());
        store.Promote("demo@2", "production", noGate: true);
        store.Delete("demo@1");
        Assert.Equal(["demo@2"], store.List().Select(v => v.Ref));
        Assert.Contains("no adapter demo@1", Assert.Throws<LoraKitException>(() => store.Resolve("demo@1")).Message);
        // A's weights and config differ from B's: both of its blobs are now garbage.
        var (blobs, bytes) = store.Gc();
        Assert.Equal(v1.Files.Count, blobs);
        Assert.Equal(v1.Files.Sum(f => f.Size), bytes);
        Assert.All(v1.Files, f => Assert.False(File.Exists(Path.Combine(dir, "blobs", "sha256", f.Blob[..2], f.Blob))));
        // Rolling back to the deleted version is refused, not a dangling alias.
        Assert.Contains("deleted", Assert.Throws<LoraKitException>(() => store.Rollback("demo", "production")).Message);
    }

    [Fact]
    public void ACorruptedOrMissingBlobIsAnErrorNamingTheVersion()
    {
        var dir = Fixtures.TempDir();
        using var store = AdapterStore.Open(dir);
        var v = store.Add("demo", A);
        var weights = v.Files.Single(f => f.File == AdapterFiles.WeightsFile);
        var path = Path.Combine(dir, "blobs", "sha256", weights.Blob[..2], weights.Blob);
        var bytes = File.ReadAllBytes(path);
        bytes[^1] ^= 0x55;
        File.WriteAllBytes(path, bytes);
        var outDir = Path.Combine(dir, "out");
        var ex = Assert.Throws<LoraKitException>(() => store.Export("demo@1", outDir));
        Assert.Contains("demo@1", ex.Message);
        Assert.Contains("corrupted", ex.Message);
        Assert.False(File.Exists(Path.Combine(outDir, AdapterFiles.WeightsFile))); // no wrong adapter left behind
        File.Delete(path);
        ex = Assert.Throws<LoraKitException>(() => store.Export("demo@1", Path.Combine(dir, "out2")));
        Assert.Contains("demo@1", ex.Message);
        Assert.Contains("missing", ex.Message);
        // Adding the content again repairs the blob.
        store.Add("demo", A);
        store.Export("demo@1", Path.Combine(dir, "out3"));
        Assert.Equal(File.ReadAllBytes(Path.Combine(A, AdapterFiles.WeightsFile)), File.ReadAllBytes(Path.Combine(dir, "out3", AdapterFiles.WeightsFile)));
    }

    [Theory]
    [InlineData("", "adapter name")]
    [InlineData("has space", "adapter name")]
    [InlineData("a/b", "adapter name")]
    [InlineData("demo@", "alias")]
    [InlineData("demo@0", "positive")]
    [InlineData("demo@x y", "alias")]
    public void BadReferencesAreOneLineErrors(string reference, string expected)
    {
        var ex = Assert.Throws<LoraKitException>(() => RegistryRef.Parse(reference));
        Assert.Contains(expected, ex.Message);
        Assert.DoesNotContain('\n', ex.Message);
    }

    [Fact]
    public void NamesAreValidatedOnAddAndLong()
    {
        using var store = AdapterStore.Open(Fixtures.TempDir());
        Assert.Throws<LoraKitException>(() => store.Add(new string('x', 101), A));
        Assert.Equal(1, store.Add(new string('x', 100), A).Version);
        Assert.Throws<LoraKitException>(() => store.Promote(new string('x', 100) + "@1", "123", noGate: true)); // an all-digit alias reads as a version
        Assert.Throws<LoraKitException>(() => store.Add("demo", Fixtures.TempDir()));                          // not an adapter folder
    }

    [Fact]
    public void AnEvalReportThatIsNotAReportOrIsAPipeIsAClearErrorAndAddsNothing()
    {
        var dir = Fixtures.TempDir();
        using var store = AdapterStore.Open(Path.Combine(dir, "reg"));
        var adapter = Fixtures.Path_("adapters", "llama", "a");
        var junk = Path.Combine(dir, "junk.json");
        File.WriteAllText(junk, "{\"format\": 3}");
        var e = Assert.Throws<LoraKitException>(() => store.Add("x", adapter, evalReportPath: junk));
        Assert.StartsWith("registry: ", e.Message);
        Assert.Contains("not a LoraKit evaluation report", e.Message);
        var fifo = Path.Combine(dir, "eval.json");
        using (var p = System.Diagnostics.Process.Start("mkfifo", [fifo])) p.WaitForExit();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        e = Assert.Throws<LoraKitException>(() => store.Add("x", adapter, evalReportPath: dir)); // the directory's eval.json is the pipe
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"took {clock.Elapsed}");
        Assert.DoesNotContain('\n', e.Message);
        Assert.Empty(store.List("x"));
    }
}
