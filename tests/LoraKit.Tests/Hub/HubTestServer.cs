using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace LoraKit.Tests.Hub;

/// <summary>
/// A Hugging Face hub on loopback, for the hub tests: the endpoints LoraKit uses, answered as the hub answers them.
/// <c>GET /api/models/{repo}/revision/{rev}</c> gives <c>{sha, siblings:[{rfilename}]}</c>; <c>HEAD/GET
/// /{repo}/resolve/{rev}/{file}</c> answers a small file itself (ETag: its git blob id, X-Repo-Commit) and redirects an
/// LFS file (*.safetensors) to <c>/cdn/{sha256}</c> on another port (the CDN's origin) with X-Linked-Etag (its sha256) and X-Linked-Size, where Range
/// requests are honoured. Gated repositories want a Bearer token (401 without one, 403 with another); unknown repos,
/// revisions and files are 404 with the hub's X-Error-Code. Every request is counted, with the bytes each body sent,
/// so tests assert what was (not) fetched. Switches make it hostile or broken (tampered bytes, a cut connection, …).
/// </summary>
public sealed class HubTestServer : IDisposable
{
    /// <summary>One commit of a repository: its files by name.</summary>
    public sealed class Commit(Dictionary<string, byte[]> files) { public Dictionary<string, byte[]> Files { get; } = files; }

    /// <summary>A repository: commits by sha, branches and tags by name, and an access token when gated.</summary>
    public sealed class Repo
    {
        public Dictionary<string, Commit> Commits { get; } = [];
        public Dictionary<string, string> Refs { get; } = [];
        public string? Token { get; set; }
        /// <summary>Names listed in siblings that resolve answers 404 for (a broken repository).</summary>
        public HashSet<string> Unresolvable { get; } = [];
    }

    readonly HttpListener _listener = new();
    readonly Thread _thread;
    readonly Dictionary<string, byte[]> _cdn = []; // sha256 → bytes
    public Dictionary<string, Repo> Repos { get; } = [];
    public ConcurrentQueue<(string Method, string Path, string? Range, string? Auth, long BodyBytes)> Requests { get; } = new();
    /// <summary>Serve other bytes (same length) at /cdn than the sha256 says.</summary>
    public bool Tamper { get; set; }
    /// <summary>Cut the connection after this many body bytes of the next /cdn GET (then back to normal).</summary>
    public long? CutNextCdnAfter { get; set; }
    /// <summary>Send this many bytes more than announced from /cdn (chunked, so the client must count).</summary>
    public int Oversend { get; set; }
    /// <summary>Overrides the revision API's sha (a hostile server).</summary>
    public string? HostileSha { get; set; }
    /// <summary>Overrides the ETag of resolve answers (a hostile server).</summary>
    public string? HostileEtag { get; set; }

    public string Endpoint { get; }
    /// <summary>Where LFS files are redirected: another origin (port), as the hub's CDN is another host.</summary>
    public string CdnEndpoint { get; }

    public HubTestServer()
    {
        Endpoint = $"http://127.0.0.1:{FreePort()}";
        CdnEndpoint = $"http://127.0.0.1:{FreePort()}";
        _listener.Prefixes.Add(Endpoint + "/");
        _listener.Prefixes.Add(CdnEndpoint + "/");
        _listener.Start();
        _thread = new Thread(Loop) { IsBackground = true };
        _thread.Start();
    }

    /// <summary>Adds a repository with one commit of <paramref name="dir"/>'s files (plus <paramref name="extra"/>) as branch main; returns the commit sha.</summary>
    public string AddRepo(string repo, string dir, Dictionary<string, byte[]>? extra = null, string branch = "main")
    {
        var files = Directory.GetFiles(dir).ToDictionary(f => Path.GetFileName(f), File.ReadAllBytes);
        foreach (var (k, v) in extra ?? []) files[k] = v;
        return AddCommit(repo, files, branch);
    }

    /// <summary>Adds a commit of <paramref name="files"/> to <paramref name="repo"/>, pointing <paramref name="branch"/> at it.</summary>
    public string AddCommit(string repo, Dictionary<string, byte[]> files, string branch = "main")
    {
        if (!Repos.TryGetValue(repo, out var r)) Repos[repo] = r = new Repo();
        string sha = Convert.ToHexStringLower(SHA1.HashData(Encoding.UTF8.GetBytes(repo + "/" + r.Commits.Count)));
        r.Commits[sha] = new Commit(files);
        r.Refs[branch] = sha;
        lock (_cdn) foreach (var bytes in files.Values) _cdn[Sha256(bytes)] = bytes;
        return sha;
    }

    public static string Sha256(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    /// <summary>git's blob id (what the hub sends as the ETag of a file not in LFS).</summary>
    public static string GitBlobId(byte[] bytes) =>
        Convert.ToHexStringLower(SHA1.HashData([.. Encoding.ASCII.GetBytes($"blob {bytes.Length}\0"), .. bytes]));

    public static bool IsLfs(string file) => file.EndsWith(".safetensors", StringComparison.Ordinal) || file.EndsWith(".bin", StringComparison.Ordinal);

    /// <summary>The requests whose path starts with <paramref name="prefix"/>.</summary>
    public List<(string Method, string Path, string? Range, string? Auth, long BodyBytes)> To(string prefix) =>
        [.. Requests.Where(q => q.Path.StartsWith(prefix, StringComparison.Ordinal))];

    static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    void Loop()
    {
        while (_listener.IsListening)
        {
            HttpListenerContext ctx;
            try { ctx = _listener.GetContext(); } catch (Exception) { return; }
            ThreadPool.QueueUserWorkItem(_ => Handle(ctx));
        }
    }

    void Handle(HttpListenerContext ctx)
    {
        var req = ctx.Request;
        var res = ctx.Response;
        string path = Uri.UnescapeDataString(req.Url!.AbsolutePath);
        long sent = 0;
        bool aborted = false;
        try { sent = Route(req, res, path); }
        catch (Exception e)
        {
            sent = e is CutException cut ? cut.Sent : 0;
            aborted = true;
            try { res.Abort(); } catch (Exception) { }
        }
        finally { Requests.Enqueue((req.HttpMethod, path, req.Headers["Range"], req.Headers["Authorization"], sent)); }
        if (!aborted) try { res.Close(); } catch (Exception) { }
    }

    long Route(HttpListenerRequest req, HttpListenerResponse res, string path)
    {
        if (path.StartsWith("/cdn/", StringComparison.Ordinal)) return Cdn(req, res, path["/cdn/".Length..]);
        var parts = req.Url!.AbsolutePath.TrimStart('/').Split('/');
        bool api = parts is ["api", "models", _, _, "revision", _, ..];
        string repoName = api ? $"{parts[2]}/{parts[3]}" : parts.Length >= 4 && parts[2] == "resolve" ? $"{parts[0]}/{parts[1]}" : "";
        if (!Repos.TryGetValue(repoName, out var repo)) return Error(res, 404, "RepoNotFound");
        if (repo.Token is { } token)
        {
            string? auth = req.Headers["Authorization"];
            if (auth is null) return Error(res, 401, "GatedRepo");
            if (auth != "Bearer " + token) return Error(res, 403, "GatedRepo");
        }
        string rev = Uri.UnescapeDataString(api ? parts[5] : parts[3]);
        string? sha = repo.Commits.ContainsKey(rev) ? rev : repo.Refs.GetValueOrDefault(rev);
        if (sha is null) return Error(res, 404, "RevisionNotFound");
        var commit = repo.Commits[sha];
        if (api) return Json(res, new { sha = HostileSha ?? sha, siblings = commit.Files.Keys.Select(f => new { rfilename = f }) });
        string file = string.Join('/', parts[4..].Select(Uri.UnescapeDataString));
        if (!commit.Files.TryGetValue(file, out var bytes) || repo.Unresolvable.Contains(file)) return Error(res, 404, "EntryNotFound");
        res.Headers["X-Repo-Commit"] = sha;
        if (IsLfs(file))
        {
            string sha256 = Sha256(bytes);
            res.StatusCode = 302;
            res.Headers["Location"] = $"{CdnEndpoint}/cdn/{sha256}";
            res.Headers["X-Linked-Etag"] = $"\"{HostileEtag ?? sha256}\"";
            res.Headers["X-Linked-Size"] = bytes.Length.ToString();
            res.Headers["ETag"] = $"\"{GitBlobId(bytes)}\"";
            return 0;
        }
        res.Headers["ETag"] = $"\"{HostileEtag ?? GitBlobId(bytes)}\"";
        return Body(req, res, bytes, 0);
    }

    long Cdn(HttpListenerRequest req, HttpListenerResponse res, string sha256)
    {
        byte[]? bytes;
        lock (_cdn) bytes = _cdn.GetValueOrDefault(sha256);
        if (bytes is null) return Error(res, 404, "EntryNotFound");
        if (Tamper) { bytes = (byte[])bytes.Clone(); bytes[^1] ^= 0xFF; }
        long from = 0;
        if (req.Headers["Range"] is { } range && range.StartsWith("bytes=", StringComparison.Ordinal) && range.EndsWith('-'))
        {
            from = long.Parse(range["bytes=".Length..^1]);
            res.StatusCode = 206;
            res.Headers["Content-Range"] = $"bytes {from}-{bytes.Length - 1}/{bytes.Length}";
        }
        return Body(req, res, bytes, from);
    }

    long Body(HttpListenerRequest req, HttpListenerResponse res, byte[] bytes, long from)
    {
        int count = (int)(bytes.Length - from);
        if (req.HttpMethod == "HEAD") { res.ContentLength64 = count; return 0; }
        bool cdn = req.Url!.AbsolutePath.StartsWith("/cdn/", StringComparison.Ordinal);
        if (cdn && Oversend > 0)
        {
            res.SendChunked = true;
            res.OutputStream.Write(bytes, (int)from, count);
            res.OutputStream.Write(new byte[Oversend]);
            return count + Oversend;
        }
        res.ContentLength64 = count;
        if (cdn && CutNextCdnAfter is long cut)
        {
            CutNextCdnAfter = null;
            res.OutputStream.Write(bytes, (int)from, (int)cut);
            res.OutputStream.Flush();
            throw new CutException(cut); // Handle aborts the response: the client sees a broken body
        }
        res.OutputStream.Write(bytes, (int)from, count);
        return count;
    }

    static long Error(HttpListenerResponse res, int status, string code)
    {
        res.StatusCode = status;
        res.Headers["X-Error-Code"] = code;
        var body = Encoding.UTF8.GetBytes($"{{\"error\":\"{code}\"}}");
        res.ContentLength64 = body.Length;
        res.OutputStream.Write(body);
        return body.Length;
    }

    static long Json(HttpListenerResponse res, object value)
    {
        var body = JsonSerializer.SerializeToUtf8Bytes(value);
        res.ContentType = "application/json";
        res.ContentLength64 = body.Length;
        res.OutputStream.Write(body);
        return body.Length;
    }

    sealed class CutException(long sent) : Exception("connection cut on purpose") { public long Sent { get; } = sent; }

    public void Dispose()
    {
        try { _listener.Stop(); _listener.Close(); } catch (Exception) { }
    }
}
