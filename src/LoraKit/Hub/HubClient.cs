using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text.Json;

namespace LoraKit.Hub;

/// <summary>What the revision endpoint says: the commit sha and the repository's file names.</summary>
public sealed record HubRevision(string Sha, IReadOnlyList<string> Files);

/// <summary>
/// What a HEAD of <c>/resolve/</c> says about one file: its commit, etag (the sha256 for an LFS file:
/// <c>X-Linked-Etag</c>), size, whether it is an LFS file (then its bytes must hash to the etag), and where to GET it.
/// </summary>
public sealed record HubFileInfo(string File, string Etag, long Size, bool IsLfs, Uri Location);

/// <summary>
/// The two hub endpoints LoraKit uses, over <see cref="HttpClient"/>, as <c>huggingface_hub</c> calls them:
/// <c>GET {endpoint}/api/models/{repo}/revision/{rev}</c> and <c>HEAD/GET {endpoint}/{repo}/resolve/{rev}/{file}</c>.
/// A HEAD follows only relative redirects (a renamed repository) so that the LFS redirect's headers
/// (<c>X-Linked-Etag</c>, <c>X-Linked-Size</c>) are read from the hub itself; GETs follow the redirect to the CDN. The token
/// goes only to the endpoint's own host. Every answer is bounded (JSON size, file size) and every failure becomes one
/// <see cref="HubException"/> line.
/// </summary>
public sealed class HubClient : IDisposable
{
    const int MaxRedirects = 5;
    const int MaxJsonBytes = 32 << 20;
    readonly HttpClient _http;
    readonly HubSettings _settings;
    readonly Uri _endpoint;

    /// <summary>A client for <paramref name="settings"/>' endpoint and token.</summary>
    public HubClient(HubSettings settings)
    {
        _settings = settings;
        if (!Uri.TryCreate(settings.Endpoint.TrimEnd('/') + "/", UriKind.Absolute, out var endpoint) || endpoint.Scheme is not ("http" or "https"))
            throw new HubException($"HF_ENDPOINT '{settings.Endpoint}' is not an http(s) URL");
        _endpoint = endpoint;
        _http = new HttpClient(new SocketsHttpHandler { AllowAutoRedirect = false, ConnectTimeout = TimeSpan.FromSeconds(20) })
        {
            Timeout = TimeSpan.FromSeconds(60), // until the headers; a body is read with its own idle limit
        };
        _http.DefaultRequestHeaders.UserAgent.ParseAdd("LoraKit/1.0 (huggingface_hub-compatible)");
    }

    /// <summary>The commit and file list of <paramref name="id"/>'s revision.</summary>
    public HubRevision Revision(HubRepoId id)
    {
        var url = new Uri(_endpoint, $"api/models/{id.Repo}/revision/{Uri.EscapeDataString(id.Revision)}");
        using var response = Send(HttpMethod.Get, url, followAll: true, range: 0, what: $"{id}");
        using var body = response.Content.ReadAsStream();
        var bytes = ReadBounded(body, MaxJsonBytes, $"{id}: the revision answer");
        try
        {
            using var doc = JsonDocument.Parse(bytes);
            var root = doc.RootElement;
            string sha = root.GetProperty("sha").GetString() ?? "";
            if (!HubRepoId.IsCommitSha(sha)) throw new HubIntegrityException($"{id}: the hub answered a commit '{sha[..Math.Min(sha.Length, 60)]}' that is not a 40-hex sha");
            var files = root.TryGetProperty("siblings", out var s) && s.ValueKind == JsonValueKind.Array
                ? s.EnumerateArray().Select(f => f.GetProperty("rfilename").GetString() ?? "").ToList() : [];
            return new HubRevision(sha, files);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw new HubIntegrityException($"{id}: the hub's revision answer is not the JSON expected (sha, siblings): {e.Message.Split('\n')[0]}");
        }
    }

    /// <summary>HEAD of one file at <paramref name="commit"/>: its etag, size and download location.</summary>
    public HubFileInfo Head(HubRepoId id, string commit, string file)
    {
        var url = ResolveUrl(id, commit, file);
        using var response = Send(HttpMethod.Head, url, followAll: false, range: 0, what: $"{id}: {file}");
        var h = response.Headers;
        string? linked = Header(h, "X-Linked-Etag");
        string? etag = linked ?? h.ETag?.Tag ?? Header(h, "ETag");
        if (etag is null) throw new HubIntegrityException($"{id}: {file}: the hub sent no ETag; cannot place the file in the cache");
        etag = HubCache.RequireSafeEtag(etag.Replace("W/", "", StringComparison.Ordinal).Trim('"'));
        long size = long.TryParse(Header(h, "X-Linked-Size"), out long linkedSize) ? linkedSize : response.Content.Headers.ContentLength ?? -1;
        if (size < 0 || size > _settings.MaxFileBytes)
            throw new HubIntegrityException($"{id}: {file}: the hub gave no size, or {size} bytes, over the {_settings.MaxFileBytes} bytes allowed");
        bool lfs = linked is not null;
        if (lfs && !System.Text.RegularExpressions.Regex.IsMatch(etag, "^[0-9a-f]{64}$"))
            throw new HubIntegrityException($"{id}: {file}: the LFS etag '{etag}' is not a sha256; cannot verify the file");
        var location = (int)response.StatusCode is >= 300 and < 400 && response.Headers.Location is { } loc ? new Uri(url, loc) : url;
        return new HubFileInfo(file, etag, size, lfs, location);
    }

    /// <summary>
    /// Downloads <paramref name="info"/> into <paramref name="partial"/>, resuming after the bytes already there with a
    /// Range request (a server that ignores it sends the whole file, which starts the file again). Never writes past the
    /// announced size. <paramref name="onBytes"/> is told the running total.
    /// </summary>
    public void Download(HubRepoId id, HubFileInfo info, string partial, Action<long> onBytes)
    {
        long have = File.Exists(partial) ? new FileInfo(partial).Length : 0;
        if (have > info.Size) { File.Delete(partial); have = 0; }
        if (have == info.Size) return;
        using var response = Send(HttpMethod.Get, info.Location, followAll: true, range: have, what: $"{id}: {info.File}");
        if (response.StatusCode != HttpStatusCode.PartialContent) have = 0;
        using var body = response.Content.ReadAsStream();
        using var output = OpenPartial(id, info, partial, append: have > 0);
        var buffer = new byte[1 << 20];
        long lastReport = have;
        onBytes(have);
        try
        {
            while (true)
            {
                using var idle = new CancellationTokenSource(TimeSpan.FromSeconds(60));
                int n = body.ReadAsync(buffer, idle.Token).AsTask().GetAwaiter().GetResult();
                if (n == 0) break;
                if (have + n > info.Size) throw new HubIntegrityException($"{id}: {info.File}: the server sent more than the {info.Size} bytes it announced; refused");
                output.Write(buffer, 0, n);
                have += n;
                if (have - lastReport >= 4 << 20) { onBytes(have); lastReport = have; }
            }
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or HttpRequestException)
        {
            throw new HubNetworkException($"{id}: {info.File}: the download broke off after {have} of {info.Size} bytes ({e.Message.Split('\n')[0]}); run again to resume", e);
        }
        onBytes(have);
        if (have != info.Size)
            throw new HubNetworkException($"{id}: {info.File}: the download ended after {have} of {info.Size} bytes; run again to resume");
    }

    /// <summary>The partial file, held exclusively: a second process downloading the same blob is told so, not interleaved.</summary>
    static FileStream OpenPartial(HubRepoId id, HubFileInfo info, string partial, bool append)
    {
        try { return new FileStream(partial, append ? FileMode.Append : FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20); }
        catch (IOException e)
        {
            throw new HubException($"{id}: {info.File}: cannot write {partial} ({e.Message.Split('\n')[0]}); another download of it may be running");
        }
    }

    /// <summary>The sha256 of a file, hex lower case (what an LFS etag is).</summary>
    public static string Sha256(string path)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, FileOptions.SequentialScan);
        return Convert.ToHexStringLower(SHA256.HashData(f));
    }

    Uri ResolveUrl(HubRepoId id, string revision, string file) => new(_endpoint,
        $"{id.Repo}/resolve/{Uri.EscapeDataString(revision)}/{string.Join('/', HubCache.RequireSafeFileName(file).Split('/').Select(Uri.EscapeDataString))}");

    /// <summary>
    /// Sends a request, following redirects (all of them, or with <paramref name="followAll"/> false only relative ones),
    /// and turns every failure into a <see cref="HubException"/>. The answer returned is a success or, for a HEAD, the
    /// redirect not followed.
    /// </summary>
    HttpResponseMessage Send(HttpMethod method, Uri url, bool followAll, long range, string what)
    {
        for (int hop = 0; ; hop++)
        {
            using var request = new HttpRequestMessage(method, url);
            if (_settings.Token is { } token && SameOrigin(url, _endpoint)) request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
            if (range > 0) request.Headers.Range = new RangeHeaderValue(range, null);
            HttpResponseMessage response;
            try { response = _http.Send(request, HttpCompletionOption.ResponseHeadersRead); }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException or IOException)
            {
                throw new HubNetworkException($"cannot reach {_endpoint.GetLeftPart(UriPartial.Authority)} for {what}: {e.Message.Split('\n')[0]} " +
                    "(HF_HUB_OFFLINE=1 uses the cache only)", e);
            }
            int status = (int)response.StatusCode;
            if (status is >= 300 and < 400 && response.Headers.Location is { } location)
            {
                bool relative = !location.IsAbsoluteUri;
                if (hop >= MaxRedirects) { response.Dispose(); throw new HubNetworkException($"{what}: more than {MaxRedirects} redirects"); }
                if (!followAll && !relative) return response;
                url = new Uri(url, location);
                response.Dispose();
                if (url.Scheme is not ("http" or "https")) throw new HubIntegrityException($"{what}: redirected to a non-http URL; refused");
                continue;
            }
            if (response.IsSuccessStatusCode) return response;
            using (response) throw Failure(response, what);
        }
    }

    HubException Failure(HttpResponseMessage response, string what)
    {
        int status = (int)response.StatusCode;
        string? code = Header(response.Headers, "X-Error-Code");
        string? message = Header(response.Headers, "X-Error-Message");
        string detail = message is null ? "" : $" ({message})";
        return status switch
        {
            401 or 403 => new HubAccessException($"{what}: access denied (HTTP {status}{(code is null ? "" : " " + code)}): the repository is gated or private" +
                (status == 401 ? " (or does not exist)" : "") + (_settings.Token is null
                    ? "; set HF_TOKEN to a token of an account that has access (accept the model's terms on its hub page if it is gated)"
                    : "; the token in HF_TOKEN has no access to it (accept the model's terms on its hub page if it is gated)")),
            404 => new HubNotFoundException($"{what}: not found on {_endpoint.GetLeftPart(UriPartial.Authority)} (HTTP 404{(code is null ? "" : " " + code)}){detail}: " +
                (code switch { "RevisionNotFound" => "no such revision", "EntryNotFound" => "no such file at that revision", "RepoNotFound" => "no such repository", _ => "check the repository id and revision" })),
            416 => new HubNetworkException($"{what}: the server refused to resume (HTTP 416); delete the .incomplete file under the cache's blobs folder and run again"),
            _ => new HubNetworkException($"{what}: HTTP {status} from {_endpoint.GetLeftPart(UriPartial.Authority)}{detail}"),
        };
    }

    static bool SameOrigin(Uri a, Uri b) => a.Scheme == b.Scheme && string.Equals(a.Host, b.Host, StringComparison.OrdinalIgnoreCase) && a.Port == b.Port;

    static string? Header(HttpResponseHeaders headers, string name) =>
        headers.TryGetValues(name, out var values) ? values.FirstOrDefault() : null;

    static byte[] ReadBounded(Stream s, int max, string what)
    {
        using var memory = new MemoryStream();
        var buffer = new byte[81920];
        int n;
        try
        {
            while ((n = s.Read(buffer)) > 0)
            {
                if (memory.Length + n > max) throw new HubIntegrityException($"{what} is over {max >> 20} MiB; refused");
                memory.Write(buffer, 0, n);
            }
        }
        catch (IOException e) { throw new HubNetworkException($"{what} broke off: {e.Message.Split('\n')[0]}", e); }
        return memory.ToArray();
    }

    /// <inheritdoc/>
    public void Dispose() => _http.Dispose();
}
