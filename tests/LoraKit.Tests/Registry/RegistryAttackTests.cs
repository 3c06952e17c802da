using System.Net;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Lora;
using LoraKit.Registry;
using LoraKit.Server;
using LoraKit.Tests.Fuzz;
using Microsoft.Data.Sqlite;

namespace LoraKit.Tests.Registry;

/// <summary>
/// The registry under attack (the review of issue 19), each case held to <see cref="FuzzContract"/>: hostile references
/// (empty, '@@', '@-1', huge numbers, SQL-ish text, path traversal, control characters, very long, unicode) are one-line
/// errors that never resolve to a version; a version number is never reused, so a rollback never lands on content that
/// was not there; an export that fails leaves no partial adapter; a damaged registry.db (not SQLite, a directory,
/// truncated) is an error naming the file; a registry from before the lineage and runs tables opens and gains them; gc
/// removes only unreferenced blobs; promotions from two connections while a reader resolves stay consistent; concurrent
/// checkouts of one version in one process all get it intact; and a
/// server answers hostile "model" strings and a registry damaged under it with 4xx/503, never 500 or another adapter.
/// </summary>
public class RegistryAttackTests
{
    static readonly string A = Fixtures.Path_("adapters", "llama", "a"), B = Fixtures.Path_("adapters", "llama", "b"), C = Fixtures.Path_("adapters", "llama", "c");

    /// <summary>References no registry may resolve, whatever it holds (it holds demo@1, demo@2 and demo@production).</summary>
    static readonly string[] Hostile =
    [
        "", "@", "@@", "demo@", "demo@@", "demo@-1", "demo@0", "demo@00", "demo@99999999999", "demo@2147483648", "demo@1@2",
        "demo@' OR '1'='1", "demo' OR '1'='1", "demo@1; DROP TABLE versions;--", "demo\"; DROP TABLE aliases;--",
        "../demo", "demo/../demo", "..\\demo", "/etc/passwd", "demo@../../production", "demo@production/..",
        "demo\n", "demo\r\n", "demo@production\n", "demo@1\n", "demo\u0000", "demo@\u0000", "de\u2028mo",
        "démo", "ｄｅｍｏ", "demo@１", "demo\u200b", "demo@prod\u0301uction", "\ud800demo", "demo@\udfff",
        new string('a', 101), "demo@" + new string('p', 101), new string('x', 1_000_000), "demo@" + new string('9', 100_000),
        string.Concat(Enumerable.Repeat("@", 10_000)),
    ];

    [Fact]
    public void HostileReferencesAreOneLineErrorsAndResolveNothing()
    {
        var reg = Path.Combine(Fixtures.TempDir(), "reg");
        using var store = AdapterStore.Open(reg);
        store.Add("demo", A);
        store.Add("demo", B);
        store.Promote("demo@1", "production", noGate: true);
        foreach (var (h, i) in Hostile.Select((h, i) => (h, i)))
        {
            string name = $"#{i} {RegistryRef.Clip(h)[..Math.Min(40, RegistryRef.Clip(h).Length)]}";
            foreach (var (what, act) in new (string, Action)[]
                     {
                         ("resolve", () => store.Resolve(h)), ("show", () => store.Show(h)), ("export", () => store.Export(h, Path.Combine(reg, "..", $"x{i}"))),
                         ("delete", () => store.Delete(h)), ("promote", () => store.Promote(h, "production", noGate: true)),
                         ("promote-alias", () => store.Promote("demo@2", h, noGate: true)), ("rollback", () => store.Rollback("demo", h)),
                         ("add", () => store.Add(h, C)),
                     })
            {
                var e = FuzzContract.Check("registry-attack", $"{what} {name}", act);
                Assert.True(e is LoraKitException, $"{what} '{name}' was accepted");
            }
        }
        // Nothing moved, nothing was added or deleted.
        Assert.Equal(["demo@1", "demo@2"], store.List().Select(v => v.Ref));
        Assert.Equal(new Dictionary<string, int> { ["production"] = 1 }, store.Show("demo").Aliases);
    }

    [Fact]
    public void VersionNumbersAreNeverReusedSoARollbackNeverLandsOnOtherContent()
    {
        var reg = Path.Combine(Fixtures.TempDir(), "reg");
        using var store = AdapterStore.Open(reg);
        store.Add("demo", A);
        store.Add("demo", B);
        store.Promote("demo@2", "production", noGate: true);
        store.Promote("demo@1", "production", noGate: true); // production's previous holder: v2
        store.Delete("demo@2");
        var c = store.Add("demo", C);
        Assert.Equal(3, c.Version); // not 2 again: "demo@2" and the alias history keep meaning the deleted content
        var e = FuzzContract.Check("registry-attack", "rollback to a deleted version", () => store.Rollback("demo", "production"));
        Assert.IsType<LoraKitException>(e);
        Assert.Contains("deleted", e!.Message);
        Assert.Equal(1, store.Resolve("demo@production").Version);
        Assert.IsType<LoraKitException>(Record.Exception(() => store.Resolve("demo@2")));
    }

    [Fact]
    public void AnExportThatFailsLeavesNoPartialAdapterAndNeverTouchesAFolderWithFiles()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        using var store = AdapterStore.Open(reg);
        var v = store.Add("demo", A);
        var weights = v.Files.Single(f => f.File == AdapterFiles.WeightsFile).Blob;
        var blobPath = Directory.GetFiles(Path.Combine(reg, "blobs"), weights, SearchOption.AllDirectories).Single();
        var bytes = File.ReadAllBytes(blobPath);
        bytes[^1] ^= 0x55;
        File.WriteAllBytes(blobPath, bytes);

        var fresh = Path.Combine(dir, "fresh");
        Assert.Contains("corrupted", FuzzContract.Check("registry-attack", "export damaged to a new folder", () => store.Export("demo@1", fresh))!.Message);
        Assert.False(Directory.Exists(fresh) && Directory.EnumerateFileSystemEntries(fresh).Any(), "a failed export left files behind");
        var empty = Directory.CreateDirectory(Path.Combine(dir, "empty")).FullName; // the user's own (empty) folder stays
        FuzzContract.Check("registry-attack", "export damaged to an empty folder", () => store.Export("demo@1", empty));
        Assert.True(Directory.Exists(empty));
        Assert.Empty(Directory.EnumerateFileSystemEntries(empty));

        var full = Directory.CreateDirectory(Path.Combine(dir, "full")).FullName;
        File.WriteAllText(Path.Combine(full, AdapterFiles.ConfigFile), "mine");
        var before = FuzzContract.Snapshot(full);
        Assert.Contains("not empty", FuzzContract.Check("registry-attack", "export into a folder with files", () => store.Export("demo@1", full))!.Message);
        FuzzContract.AssertUntouched(before, full, "export");
        Assert.Equal(before.Count, FuzzContract.Snapshot(full).Count);
    }

    [Fact]
    public void ADamagedDatabaseIsAnErrorNamingItsFile()
    {
        var dir = Fixtures.TempDir();
        // A populated registry, closed (its WAL checkpointed into registry.db), to damage copies of.
        var good = Path.Combine(dir, "good");
        using (var store = AdapterStore.Open(good))
        {
            store.Add("demo", A);
            store.Add("demo", B);
            store.Promote("demo@1", "production", noGate: true);
        }
        var dbBytes = File.ReadAllBytes(Path.Combine(good, AdapterStore.DbFile));
        Assert.True(dbBytes.Length > 8192, $"registry.db is {dbBytes.Length} bytes");

        var cases = new List<(string Name, Action<string> Damage)>
        {
            ("not sqlite", root => File.WriteAllText(Path.Combine(root, AdapterStore.DbFile), "this is not a database\n" + new string('x', 5000))),
            ("random bytes", root => File.WriteAllBytes(Path.Combine(root, AdapterStore.DbFile), RandomBytes(64 * 1024))),
            ("a directory", root => Directory.CreateDirectory(Path.Combine(root, AdapterStore.DbFile))),
            ("header only", root => File.WriteAllBytes(Path.Combine(root, AdapterStore.DbFile), dbBytes[..100])),
            ("truncated to one page", root => File.WriteAllBytes(Path.Combine(root, AdapterStore.DbFile), dbBytes[..4096])),
            ("truncated to half", root => File.WriteAllBytes(Path.Combine(root, AdapterStore.DbFile), dbBytes[..(dbBytes.Length / 2)])),
            ("pages zeroed", root =>
            {
                var b = (byte[])dbBytes.Clone();
                Array.Clear(b, 4096, b.Length - 4096);
                File.WriteAllBytes(Path.Combine(root, AdapterStore.DbFile), b);
            }),
        };
        foreach (var (name, damage) in cases)
        {
            var root = Path.Combine(dir, name.Replace(' ', '-'));
            Directory.CreateDirectory(root);
            damage(root);
            // Whatever opens: the writer, the server's reader and the run log; then the reads a command does. Each either
            // works (SQLite may not notice every truncation) or fails with one line naming registry.db.
            foreach (var (what, act) in new (string, Action)[]
                     {
                         ("store", () => { using var s = AdapterStore.Open(root); s.List(); s.Show("demo"); s.Resolve("demo@production"); }),
                         ("reader", () => { using var r = RegistryReader.Open(root); r.Find("demo", 1); r.FindAlias("demo", "production"); r.Listed(3, 300); }),
                         ("runs", () => { using var l = RunLog.OpenExisting(root); l?.List(); }),
                     })
            {
                var e = FuzzContract.Check("registry-attack", $"{what}: registry.db {name}", act);
                if (e is not null) Assert.Contains(AdapterStore.DbFile, e.Message);
            }
        }
    }

    [Fact]
    public void ARegistryFromBeforeLineageAndRunsOpensAndGainsThem()
    {
        var reg = Path.Combine(Fixtures.TempDir(), "reg");
        using (var store = AdapterStore.Open(reg))
        {
            store.Add("demo", A);
            store.Promote("demo@1", "production", noGate: true);
        }
        using (var db = new SqliteConnection($"Data Source={Path.Combine(reg, AdapterStore.DbFile)};Pooling=False"))
        {
            db.Open();
            using var cmd = db.CreateCommand();
            cmd.CommandText = "DROP TABLE lineage; DROP TABLE runs;"; // the schema as the first registries wrote it
            cmd.ExecuteNonQuery();
        }
        using (var reader = RegistryReader.Open(reg)) // the server's view reads only the original tables
            Assert.Equal(1, reader.FindAlias("demo", "production")!.Version);
        using (var store = AdapterStore.Open(reg))
        {
            Assert.Null(store.LineageOf("demo@1"));
            Assert.Empty(store.Show("demo").Lineage);
            Assert.False(store.Diff("demo@1", "demo@production").Differs);
        }
        using (var log = RunLog.OpenExisting(reg)!) Assert.Empty(log.List());
        // ...while one a later LoraKit wrote (a higher schema) is refused, naming the file, and left as it was.
        using (var db = new SqliteConnection($"Data Source={Path.Combine(reg, AdapterStore.DbFile)};Pooling=False"))
        {
            db.Open();
            using var cmd = db.CreateCommand();
            cmd.CommandText = $"UPDATE meta SET value='{RegistrySchema.Version + 1}' WHERE key='schema'";
            cmd.ExecuteNonQuery();
        }
        var e = FuzzContract.Check("registry-attack", "newer schema", () => AdapterStore.Open(reg).Dispose())!;
        Assert.Contains("newer LoraKit", e.Message);
        Assert.Contains(AdapterStore.DbFile, e.Message);
    }

    [Fact]
    public void GcRemovesOnlyUnreferencedBlobsAndNothingElse()
    {
        var reg = Path.Combine(Fixtures.TempDir(), "reg");
        using var store = AdapterStore.Open(reg);
        store.Add("demo", A);
        var b = store.Add("demo", B);
        store.Checkout("demo@1");
        store.Delete(b.Ref);
        File.WriteAllText(Path.Combine(reg, "notes.txt"), "mine");
        File.WriteAllText(Path.Combine(reg, "blobs", "README"), "mine too");
        var others = Directory.EnumerateFiles(reg, "*", SearchOption.AllDirectories)
            .Where(f => !f.StartsWith(Path.Combine(reg, "blobs", "sha256"), StringComparison.Ordinal) && !Path.GetFileName(f).StartsWith(AdapterStore.DbFile, StringComparison.Ordinal))
            .ToDictionary(f => f, File.ReadAllText);
        var (removed, _) = store.Gc();
        Assert.Equal(b.Files.Select(f => f.Blob).Except(store.List().SelectMany(v => v.Files).Select(f => f.Blob)).Count(), removed);
        foreach (var (f, text) in others) Assert.Equal(text, File.ReadAllText(f));
        var outDir = Path.Combine(Fixtures.TempDir(), "out");
        store.Export("demo@1", outDir); // what is still registered is intact
        Assert.Equal(AdapterDigest.Compute(A), AdapterDigest.Compute(outDir));
    }

    [Fact]
    public async Task PromotionsFromTwoConnectionsWhileAReaderResolvesStayConsistent()
    {
        var reg = Path.Combine(Fixtures.TempDir(), "reg");
        var shas = new Dictionary<int, string>();
        using (var store = AdapterStore.Open(reg))
            foreach (var d in new[] { A, B, C }) { var v = store.Add("demo", d); shas[v.Version] = v.Sha256; }
        const int Moves = 40;
        using var stop = new CancellationTokenSource();
        Task Writer(int seed) => Task.Run(() =>
        {
            using var store = AdapterStore.Open(reg); // its own connection, as another process has
            var rng = new Random(seed);
            for (int i = 0; i < Moves; i++)
            {
                if (i > 1 && rng.Next(4) == 0) store.Rollback("demo", "production");
                else store.Promote($"demo@{rng.Next(1, 4)}", "production", noGate: true);
            }
        });
        var reads = Task.Run(() =>
        {
            using var reader = RegistryReader.Open(reg);
            int n = 0;
            while (!stop.IsCancellationRequested)
            {
                if (reader.FindAlias("demo", "production") is { } e) Assert.Equal(shas[e.Version], e.Sha256);
                n++;
            }
            return n;
        });
        await Task.WhenAll(Writer(1), Writer(2));
        stop.Cancel();
        Assert.True(await reads > 0);
        using var check = AdapterStore.Open(reg);
        var details = check.Show("demo");
        Assert.Equal(2 * Moves, details.History.Count); // every move recorded, none lost to a race
        Assert.Equal(details.History[^1].Version, details.Aliases["production"]);
        for (int i = 1; i < details.History.Count; i++) Assert.Equal(details.History[i - 1].Version, details.History[i].Previous);
    }

    [Fact]
    public async Task ConcurrentCheckoutsOfOneVersionAllGetItIntact()
    {
        var reg = Path.Combine(Fixtures.TempDir(), "reg");
        string sha;
        using (var store = AdapterStore.Open(reg)) sha = store.Add("demo", A).Sha256;
        // Six stores in one process (one pid) checking out the same version at once, as a library user's threads may.
        var dirs = await Task.WhenAll(Enumerable.Range(0, 6).Select(_ => Task.Run(() =>
        {
            using var s = AdapterStore.Open(reg);
            return s.Checkout("demo@1").Dir;
        })));
        Assert.Single(dirs.Distinct());
        Assert.Equal(sha, AdapterDigest.Compute(dirs[0]));
        Assert.Empty(Directory.GetDirectories(Path.Combine(reg, AdapterStore.CheckoutDir), ".*")); // no temporary folder left behind
    }

    [Fact]
    public async Task AServerAnswersHostileModelsAndADamagedRegistryWithoutA500()
    {
        var dir = Fixtures.TempDir();
        var reg = Path.Combine(dir, "reg");
        using (var store = AdapterStore.Open(reg))
        {
            store.Add("demo", A);
            store.Add("demo", B);
            store.Promote("demo@1", "production", noGate: true);
        }
        await using var server = await OpenAiServer.StartAsync(new ServerOptions
        {
            Model = Fixtures.Model("llama"), Registry = reg, Port = 0, Device = "cpu", MaxTokens = 8, ModelName = "tiny",
        });
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        foreach (var h in Hostile.Where(h => h.Length > 0).Append("demo@1#" + new string('0', 64)).Append("demo@staging").Append("demo@3"))
        {
            using var res = await http.SendAsync(Chat(h));
            int code = (int)res.StatusCode;
            Assert.True(code is 400 or 404, $"'{RegistryRef.Clip(h)}': {code} {await res.Content.ReadAsStringAsync()}");
            Assert.False(res.Headers.Contains(OpenAiServer.ServedVersionHeader), $"'{RegistryRef.Clip(h)}' was served a registry version");
            Assert.NotNull(JsonNode.Parse(await res.Content.ReadAsStringAsync())?["error"]?["message"]);
        }
        // Engine keys are not names: an admin load of one (with a corrupted blob behind it or none) is a 4xx/503.
        using (var admin = await http.PostAsync($"/admin/adapters/{Uri.EscapeDataString("demo@1#" + new string('0', 64))}/load", null))
            Assert.True((int)admin.StatusCode is 404 or 422, $"admin load: {(int)admin.StatusCode}");
        Assert.Equal(HttpStatusCode.OK, (await http.SendAsync(Chat("demo"))).StatusCode);

        // The registry is overwritten with garbage under the running server: requests and /v1/models say so, never 500.
        File.WriteAllBytes(Path.Combine(reg, AdapterStore.DbFile), RandomBytes(64 * 1024));
        File.Delete(Path.Combine(reg, AdapterStore.DbFile + "-wal"));
        using (var models = await http.GetAsync("/v1/models"))
            Assert.True((int)models.StatusCode is 200 or 503, $"/v1/models: {(int)models.StatusCode}");
        foreach (var model in new[] { "demo@2", "demo@production", "demo" })
        {
            using var res = await http.SendAsync(Chat(model));
            Assert.True((int)res.StatusCode is 200 or 404 or 503, $"{model} on a damaged registry: {(int)res.StatusCode}");
        }
    }

    static HttpRequestMessage Chat(string model) => new(HttpMethod.Post, "/v1/chat/completions")
    {
        Content = new StringContent(JsonSerializer.Serialize(new { model, messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 4, temperature = 0 }),
            Encoding.UTF8, "application/json"),
    };

    static byte[] RandomBytes(int n)
    {
        var b = new byte[n];
        new Random(19).NextBytes(b);
        return b;
    }
}
