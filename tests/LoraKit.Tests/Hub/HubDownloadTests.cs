using System.Text;
using LoraKit.Generation;
using LoraKit.Hub;

namespace LoraKit.Tests.Hub;

/// <summary>
/// Hub downloads against <see cref="HubTestServer"/> on loopback over the fixture models: the cache is laid out as
/// huggingface_hub lays it out, only the needed files are fetched, LFS files are checked against their sha256, partial
/// downloads resume, and every failure (access, missing, offline, hostile server) is one clear line.
/// </summary>
public sealed class HubDownloadTests : IDisposable
{
    readonly HubTestServer _server = new();
    readonly string _cache = Fixtures.TempDir();

    public void Dispose()
    {
        _server.Dispose();
        try { Directory.Delete(_cache, recursive: true); } catch (IOException) { }
    }

    HubSettings Settings(string? token = null, bool offline = false, string? endpoint = null) =>
        new() { CacheDir = _cache, Endpoint = endpoint ?? _server.Endpoint, Token = token, Offline = offline };

    static string[] Tokens(LoraKitModel m) =>
        [.. m.Generate("The quick brown fox", new SamplingOptions { MaxNewTokens = 8 }).OutputIds.Select(i => i.ToString())];

    /// <summary>The blob a snapshot file's relative symlink points to, checked to be ../../blobs/ETAG.</summary>
    static string LinkedBlob(string snapshotFile)
    {
        var target = new FileInfo(snapshotFile).LinkTarget;
        Assert.NotNull(target);
        Assert.StartsWith("../../blobs/", target);
        return Path.GetFileName(target);
    }

    [Fact]
    public void DownloadLaysOutTheCacheFetchesOnlyNeededFilesAndGeneratesAsTheLocalFolder()
    {
        var extra = new Dictionary<string, byte[]> { ["pytorch_model.bin"] = new byte[1000], ["README.md"] = "# a model"u8.ToArray() };
        string commit = _server.AddRepo("org/llama", Fixtures.Model("llama"), extra);
        using var hub = LoraKitModel.FromPretrained("org/llama", "cpu", "fp32", hub: Settings());
        using var local = LoraKitModel.FromPretrained(Fixtures.Model("llama"), "cpu", "fp32");
        Assert.Equal(Tokens(local), Tokens(hub));

        var repo = Path.Combine(_cache, "models--org--llama");
        Assert.Equal(Path.Combine(repo, "snapshots", commit), hub.Directory);
        Assert.Equal(commit, File.ReadAllText(Path.Combine(repo, "refs", "main"))); // no newline, as huggingface_hub writes it
        foreach (var f in Directory.GetFiles(Fixtures.Model("llama")))
        {
            string name = Path.GetFileName(f), inSnapshot = Path.Combine(hub.Directory!, name);
            byte[] bytes = File.ReadAllBytes(f);
            Assert.Equal(HubTestServer.IsLfs(name) ? HubTestServer.Sha256(bytes) : HubTestServer.GitBlobId(bytes), LinkedBlob(inSnapshot));
            Assert.Equal(bytes, File.ReadAllBytes(inSnapshot));
        }
        Assert.DoesNotContain(_server.To("/org/llama/resolve/"), q => q.Path.EndsWith(".bin") || q.Path.EndsWith(".md"));
        Assert.Empty(Directory.GetFiles(Path.Combine(repo, "blobs"), "*.incomplete"));

        // Again: one revision request, nothing downloaded, the same folder.
        int before = _server.Requests.Count;
        Assert.Equal(hub.Directory, HubDownloader.Download(HubRepoId.Parse("org/llama"), HubFileSet.Model, Settings()));
        Assert.Equal(["/api/models/org/llama/revision/main"], _server.Requests.Skip(before).Select(q => q.Path));
    }

    [Fact]
    public void ShardedModelFetchesTheShardsItsIndexNames()
    {
        _server.AddRepo("org/mistral", Fixtures.Model("mistral"), new() { ["model.safetensors"] = new byte[10] }); // stray: not needed
        string snapshot = HubDownloader.Download(HubRepoId.Parse("org/mistral"), HubFileSet.Model, Settings());
        foreach (var f in Directory.GetFiles(Fixtures.Model("mistral")))
            Assert.Equal(File.ReadAllBytes(f), File.ReadAllBytes(Path.Combine(snapshot, Path.GetFileName(f))));
        Assert.False(File.Exists(Path.Combine(snapshot, "model.safetensors")));
        Assert.Empty(_server.To("/org/mistral/resolve/main/model.safetensors"));
        Assert.Equal(6, _server.To("/cdn/").Count(q => q.Method == "GET"));
    }

    [Fact]
    public void IncludeFetchesOnlyTheMatchingFiles()
    {
        _server.AddRepo("org/llama", Fixtures.Model("llama"), new() { ["sub/notes.json"] = "{}"u8.ToArray() });
        var id = HubRepoId.Parse("org/llama");
        string snapshot = HubDownloader.Download(id, HubFileSet.Matching(["*.json"]), Settings());
        var got = Directory.GetFiles(snapshot, "*", SearchOption.AllDirectories).Select(f => Path.GetRelativePath(snapshot, f)).Order(StringComparer.Ordinal).ToList();
        Assert.Equal(["config.json", "generation_config.json", "sub/notes.json", "tokenizer.json", "tokenizer_config.json"], got);
        Assert.Equal("../../../blobs/" + HubTestServer.GitBlobId("{}"u8.ToArray()), new FileInfo(Path.Combine(snapshot, "sub", "notes.json")).LinkTarget);
        Assert.Empty(_server.To("/cdn/"));
        Assert.Equal(snapshot, HubDownloader.Download(id, HubFileSet.Matching(["*.json"]), Settings(offline: true)));
        Assert.Throws<HubOfflineException>(() => HubDownloader.Download(id, HubFileSet.Matching(["*.safetensors"]), Settings(offline: true)));
    }

    [Fact]
    public void BrokenDownloadResumesWithARangeRequest()
    {
        _server.AddRepo("org/llama", Fixtures.Model("llama"));
        byte[] weights = File.ReadAllBytes(Path.Combine(Fixtures.Model("llama"), "model.safetensors"));
        string sha = HubTestServer.Sha256(weights);
        _server.CutNextCdnAfter = 200_000;
        var id = HubRepoId.Parse("org/llama");
        var e = Assert.Throws<HubNetworkException>(() => HubDownloader.Download(id, HubFileSet.Model, Settings()));
        Assert.Contains("run again to resume", e.Message);
        string blob = Path.Combine(_cache, "models--org--llama", "blobs", sha);
        Assert.False(File.Exists(blob));
        long partial = new FileInfo(blob + ".incomplete").Length;
        Assert.InRange(partial, 1, 200_000);
        Assert.False(File.Exists(Path.Combine(_cache, "models--org--llama", "refs", "main")));

        var lines = new StringWriter();
        string snapshot = HubDownloader.Download(id, HubFileSet.Model, Settings() with { Progress = new HubProgressLines(lines) });
        var resumed = _server.To("/cdn/").Last();
        Assert.Equal($"bytes={partial}-", resumed.Range);
        Assert.Equal(weights.Length - partial, resumed.BodyBytes);
        Assert.Equal(weights, File.ReadAllBytes(Path.Combine(snapshot, "model.safetensors")));
        Assert.False(File.Exists(blob + ".incomplete"));
        Assert.Contains($"resuming after {partial} of {weights.Length} bytes", lines.ToString());
        Assert.Contains("model.safetensors", lines.ToString());
    }

    [Fact]
    public void Sha256MismatchIsRefusedAndLeavesNothingThatLooksComplete()
    {
        _server.AddRepo("org/llama", Fixtures.Model("llama"));
        _server.Tamper = true;
        var id = HubRepoId.Parse("org/llama");
        var e = Assert.Throws<HubIntegrityException>(() => HubDownloader.Download(id, HubFileSet.Model, Settings()));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("sha256", e.Message);
        var repo = Path.Combine(_cache, "models--org--llama");
        Assert.DoesNotContain(Directory.GetFiles(Path.Combine(repo, "blobs")), f => f.EndsWith(".incomplete") || new FileInfo(f).Length > 100_000);
        Assert.False(File.Exists(Path.Combine(repo, "refs", "main")));
        Assert.DoesNotContain(Directory.EnumerateFileSystemEntries(repo, "*", SearchOption.AllDirectories), f => f.EndsWith("model.safetensors"));
        Assert.Throws<HubOfflineException>(() => HubDownloader.Download(id, HubFileSet.Model, Settings(offline: true)));
    }

    [Fact]
    public void AccessAndNotFoundAreOneClearLine()
    {
        _server.AddRepo("org/gated", Fixtures.Model("llama"));
        _server.Repos["org/gated"].Token = "hf_right";
        var gated = HubRepoId.Parse("org/gated");
        var e401 = Assert.Throws<HubAccessException>(() => HubDownloader.Download(gated, HubFileSet.Model, Settings()));
        Assert.Contains("HTTP 401", e401.Message);
        Assert.Contains("set HF_TOKEN", e401.Message);
        var e403 = Assert.Throws<HubAccessException>(() => HubDownloader.Download(gated, HubFileSet.Model, Settings(token: "hf_wrong")));
        Assert.Contains("HTTP 403", e403.Message);
        Assert.Contains("HF_TOKEN has no access", e403.Message);
        Assert.True(Directory.Exists(HubDownloader.Download(gated, HubFileSet.Model, Settings(token: "hf_right"))));
        Assert.Contains(_server.To("/org/gated/resolve/"), q => q.Auth == "Bearer hf_right");
        Assert.NotEmpty(_server.To("/cdn/"));
        Assert.All(_server.To("/cdn/"), q => Assert.Null(q.Auth)); // the token goes to the hub, never to the CDN's origin

        var noRepo = Assert.Throws<HubNotFoundException>(() => HubDownloader.Download(HubRepoId.Parse("org/nothing"), HubFileSet.Model, Settings()));
        Assert.Contains("org/nothing", noRepo.Message);
        Assert.Contains("no such repository", noRepo.Message);
        var noRev = Assert.Throws<HubNotFoundException>(() => HubDownloader.Download(HubRepoId.Parse("org/gated@v9"), HubFileSet.Model, Settings(token: "hf_right")));
        Assert.Contains("no such revision", noRev.Message);
        _server.AddRepo("org/broken", Fixtures.Model("llama"));
        _server.Repos["org/broken"].Unresolvable.Add("tokenizer.json");
        var noFile = Assert.Throws<HubNotFoundException>(() => HubDownloader.Download(HubRepoId.Parse("org/broken"), HubFileSet.Model, Settings()));
        Assert.Contains("tokenizer.json", noFile.Message);
        Assert.Contains("no such file", noFile.Message);
        var notAdapter = Assert.Throws<HubNotFoundException>(() => HubDownloader.Download(HubRepoId.Parse("org/broken"), HubFileSet.Adapter, Settings()));
        Assert.Contains("adapter_config.json", notAdapter.Message);
        foreach (var m in new[] { e401.Message, e403.Message, noRepo.Message, noRev.Message, noFile.Message }) Assert.DoesNotContain('\n', m);
    }

    [Fact]
    public void OfflineUsesTheCacheOnlyAndAnUnreachableHubFallsBackToIt()
    {
        _server.AddRepo("org/llama", Fixtures.Model("llama"));
        var id = HubRepoId.Parse("org/llama");
        var offline = Assert.Throws<HubOfflineException>(() => HubDownloader.Download(id, HubFileSet.Model, Settings(offline: true)));
        Assert.Contains("HF_HUB_OFFLINE", offline.Message);
        Assert.Empty(_server.Requests);
        string closed = "http://127.0.0.1:1";
        var down = Assert.Throws<HubNetworkException>(() => HubDownloader.Download(id, HubFileSet.Model, Settings(endpoint: closed)));
        Assert.Contains("cannot reach", down.Message);

        string snapshot = HubDownloader.Download(id, HubFileSet.Model, Settings());
        int requests = _server.Requests.Count;
        Assert.Equal(snapshot, HubDownloader.Download(id, HubFileSet.Model, Settings(offline: true)));
        Assert.Equal(requests, _server.Requests.Count);
        var lines = new StringWriter();
        Assert.Equal(snapshot, HubDownloader.Download(id, HubFileSet.Model, Settings(endpoint: closed) with { Progress = new HubProgressLines(lines) }));
        Assert.Contains("using the cached snapshot", lines.ToString());
    }

    [Fact]
    public void RevisionsPinByBranchTagAndCommit()
    {
        string v1 = _server.AddRepo("org/llama", Fixtures.Model("llama"), branch: "v1");
        var files = Directory.GetFiles(Fixtures.Model("llama")).ToDictionary(f => Path.GetFileName(f), File.ReadAllBytes);
        files["generation_config.json"] = Encoding.UTF8.GetBytes("{\"eos_token_id\": 2, \"max_length\": 77}");
        string main = _server.AddCommit("org/llama", files);
        Assert.NotEqual(v1, main);

        string atV1 = HubDownloader.Download(HubRepoId.Parse("org/llama@v1"), HubFileSet.Model, Settings());
        string atMain = HubDownloader.Download(HubRepoId.Parse("org/llama"), HubFileSet.Model, Settings());
        var repo = Path.Combine(_cache, "models--org--llama");
        Assert.Equal(v1, File.ReadAllText(Path.Combine(repo, "refs", "v1")));
        Assert.Equal(main, File.ReadAllText(Path.Combine(repo, "refs", "main")));
        Assert.EndsWith(v1, atV1);
        Assert.EndsWith(main, atMain);
        Assert.Contains("77", File.ReadAllText(Path.Combine(atMain, "generation_config.json")));
        Assert.DoesNotContain("77", File.ReadAllText(Path.Combine(atV1, "generation_config.json")));
        Assert.Single(_server.To("/cdn/"), q => q.Method == "GET"); // the weights' blob is shared by both commits

        int before = _server.Requests.Count;
        Assert.Equal(atV1, HubDownloader.Download(HubRepoId.Parse("org/llama@" + v1), HubFileSet.Model, Settings()));
        Assert.Equal(before, _server.Requests.Count); // a cached commit needs no network
        Assert.False(File.Exists(Path.Combine(repo, "refs", v1)));
    }

    /// <summary>
    /// A cache built by hand exactly as huggingface_hub writes one (blobs named by etag, refs/main, relative symlinks in
    /// the snapshot, a .no_exist folder) is read without any request, and the model in it loads and generates.
    /// </summary>
    [Fact]
    public void ACacheWrittenByHuggingFaceHubLoadsWithoutNetwork()
    {
        const string commit = "0123456789abcdef0123456789abcdef01234567";
        var repo = Path.Combine(_cache, "models--meta-llama--Tiny-Llama");
        var snapshot = Path.Combine(repo, "snapshots", commit);
        Directory.CreateDirectory(Path.Combine(repo, "blobs"));
        Directory.CreateDirectory(Path.Combine(repo, "refs"));
        Directory.CreateDirectory(snapshot);
        Directory.CreateDirectory(Path.Combine(repo, ".no_exist", commit));
        File.WriteAllText(Path.Combine(repo, ".no_exist", commit, "model.safetensors.index.json"), "");
        File.WriteAllText(Path.Combine(repo, "refs", "main"), commit);
        foreach (var f in Directory.GetFiles(Fixtures.Model("llama")))
        {
            byte[] bytes = File.ReadAllBytes(f);
            string name = Path.GetFileName(f), etag = HubTestServer.IsLfs(name) ? HubTestServer.Sha256(bytes) : HubTestServer.GitBlobId(bytes);
            File.WriteAllBytes(Path.Combine(repo, "blobs", etag), bytes);
            File.CreateSymbolicLink(Path.Combine(snapshot, name), $"../../blobs/{etag}");
        }
        using (var m = LoraKitModel.FromPretrained("meta-llama/Tiny-Llama", "cpu", "fp32", hub: Settings(offline: true)))
        using (var local = LoraKitModel.FromPretrained(Fixtures.Model("llama"), "cpu", "fp32"))
        {
            Assert.Equal(snapshot, m.Directory);
            Assert.Equal(Tokens(local), Tokens(m));
        }
        Assert.Equal(snapshot, HubDownloader.Download(HubRepoId.Parse("meta-llama/Tiny-Llama@" + commit), HubFileSet.Model, Settings()));
        Assert.Empty(_server.Requests);
    }

    [Fact]
    public void AHostileServerCannotWriteOutsideTheCacheOrSendUnboundedData()
    {
        _server.AddRepo("org/evil", Fixtures.Model("llama"), new() { ["../../../escaped.txt"] = "x"u8.ToArray() });
        var id = HubRepoId.Parse("org/evil");
        var traversal = Assert.Throws<HubIntegrityException>(() => HubDownloader.Download(id, HubFileSet.Matching(["*"]), Settings()));
        Assert.Contains("outside the snapshot", traversal.Message);
        var index = "{\"weight_map\": {\"a\": \"../../../../escaped.safetensors\"}}"u8.ToArray();
        _server.AddRepo("org/evil-index", Fixtures.Model("llama"), new() { ["model.safetensors.index.json"] = index });
        Assert.Contains("outside the snapshot", Assert.Throws<HubIntegrityException>(() =>
            HubDownloader.Download(HubRepoId.Parse("org/evil-index"), HubFileSet.Model, Settings())).Message);

        _server.AddRepo("org/llama", Fixtures.Model("llama"));
        var llama = HubRepoId.Parse("org/llama");
        _server.HostileSha = "../../../../tmp";
        Assert.Contains("not a 40-hex sha", Assert.Throws<HubIntegrityException>(() => HubDownloader.Download(llama, HubFileSet.Model, Settings())).Message);
        _server.HostileSha = null;
        _server.HostileEtag = "../../x";
        Assert.Contains("not a plain hash", Assert.Throws<HubIntegrityException>(() => HubDownloader.Download(llama, HubFileSet.Model, Settings())).Message);
        _server.HostileEtag = null;
        Assert.Contains("bytes allowed", Assert.Throws<HubIntegrityException>(() =>
            HubDownloader.Download(llama, HubFileSet.Model, Settings() with { MaxFileBytes = 100_000 })).Message);
        _server.Oversend = 1 << 20;
        Assert.Contains("more than", Assert.Throws<HubIntegrityException>(() => HubDownloader.Download(llama, HubFileSet.Model, Settings())).Message);
        Assert.Empty(Directory.GetFiles(Path.GetDirectoryName(_cache)!, "escaped*", SearchOption.TopDirectoryOnly));
        Assert.DoesNotContain(Directory.EnumerateFiles(_cache, "*", SearchOption.AllDirectories), f => f.Contains("escaped"));

        foreach (var bad in new[] { "../x", "a/../b", "a/b/c", "/a/b", "a--b/c", "a/b.git", "a/b@../../x", "a/b@", ".a/b", "a/b@refs\\x" })
            Assert.Null(HubRepoId.TryParse(bad));
        Assert.Equal(new HubRepoId("Qwen/Qwen2.5-0.5B", "refs/pr/1"), HubRepoId.TryParse("Qwen/Qwen2.5-0.5B@refs/pr/1"));
    }
}
