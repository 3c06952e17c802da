using System.Globalization;
using System.Text.Json.Nodes;
using LoraKit.Registry;

namespace LoraKit.Server;

/// <summary>
/// Serving from the adapter registry (<see cref="ServerOptions.Registry"/>): a request's <c>"model"</c> may be
/// <c>NAME@VERSION</c>, <c>NAME@ALIAS</c>, or a plain registered <c>NAME</c>, which means <c>NAME@production</c> and is a
/// 404 when that alias does not exist (never "the latest version": a server must not start serving an unpromoted one).
/// Aliases are read from the database on every request (two or three indexed SELECTs on the request thread, never on the
/// engine thread; WAL readers never wait for a writer), so an alias moved by <c>lorakit registry promote/rollback</c> in another
/// process applies to the next request. The adapter is loaded under an engine key naming the immutable content,
/// <c>NAME@VERSION#sha256</c>: a request keeps the version it resolved until it ends (its lease holds it in memory), and
/// the old version leaves memory through the usual LRU once no request uses it.
/// Status codes: malformed reference 400; unknown name, version or alias 404 (saying which exist); a version recorded as
/// trained on another base 422 (unless <see cref="ServerOptions.AllowBaseMismatch"/>); a missing or corrupted blob 503
/// (the request was right, the stored adapter is not: it names the version and how to repair it).
/// </summary>
public sealed class RegistryModels(RegistryReader reader, string baseName, string? baseFingerprint, bool allowBaseMismatch) : IDisposable
{
    /// <summary>Per name, the newest versions /v1/models lists besides every aliased one.</summary>
    public const int NewestListed = 3;
    /// <summary>Registry entries (versions) /v1/models lists at most, so a registry with thousands stays a short answer.</summary>
    public const int MaxListedVersions = 300;

    /// <summary>A registry model a request resolved to: the engine key, the version, and the alias it came through (null for NAME@VERSION).</summary>
    public sealed record Served(string Key, RegistryEntry Entry, string? Alias);

    /// <summary>
    /// The registry model <paramref name="model"/> names, or null when it is not the registry's (no '@' and no registered
    /// name: the caller tries adapter directories). Throws <see cref="ApiError"/> 400/404/422 as the class comment says.
    /// </summary>
    public Served? Resolve(string model)
    {
        bool qualified = model.Contains('@');
        RegistryRef r;
        try { r = RegistryRef.Parse(model); }
        catch (LoraKitException e) when (qualified) { throw new ApiError(400, $"\"model\" '{Shown(model)}' is not a registry reference: {e.Message["registry: ".Length..]}", "model"); }
        catch (LoraKitException) { return null; } // not a valid registry name: the adapter-directory path reports it
        if (!qualified && !reader.HasName(r.Name)) return null;
        string alias = r.Alias ?? (r.Version is null ? RegistryRef.DefaultAlias : "");
        var entry = r.Version is { } v ? reader.Find(r.Name, v) : reader.FindAlias(r.Name, alias);
        if (entry is null) throw new ApiError(404, NotFound(r, alias), "model");
        if (!allowBaseMismatch && entry.BaseFingerprint is { } recorded && baseFingerprint is { } actual && !string.Equals(recorded, actual, StringComparison.OrdinalIgnoreCase))
            throw new ApiError(422, $"adapter {entry.Ref} was trained on another base model ({Models.BaseFingerprint.Short(recorded)}); this server's base '{baseName}' is {Models.BaseFingerprint.Short(actual)}", "model");
        return new Served($"{entry.Ref}#{entry.Sha256}", entry, r.Version is null ? alias : null);
    }

    /// <summary>A 404's message: what is missing, and which aliases and versions the name does have.</summary>
    string NotFound(RegistryRef r, string alias)
    {
        var (count, lowest, highest) = reader.VersionRange(r.Name);
        if (count == 0) return $"no registered adapter named '{r.Name}' (see /v1/models)";
        var aliases = reader.Aliases(r.Name, limit: 20);
        string versions = count == 1 ? $"version {lowest}" : $"{count} versions, {lowest} to {highest}";
        string has = $"{r.Name} has {versions} and {(aliases.Count == 0 ? "no aliases" : "aliases " + string.Join(", ", aliases.Select(a => $"{a.Alias} (v{a.Version})")))}";
        return r.Version is { } v ? $"no version {v} of '{r.Name}': {has}"
            : r.Alias is null ? $"'{r.Name}' alone means {r.Name}@{RegistryRef.DefaultAlias}, and it has no '{RegistryRef.DefaultAlias}' alias; name one: {has}"
            : $"'{r.Name}' has no alias '{alias}': {has}";
    }

    /// <summary>
    /// The folder to load for an engine key (<see cref="Serving.AdapterRegistry.External"/>): a verified checkout. A missing
    /// or damaged blob, or a database that cannot be read, is an <see cref="AdapterUnavailableException"/> (503).
    /// </summary>
    public string Checkout(string key)
    {
        int hash = key.IndexOf('#');
        if (hash < 0) throw new KeyNotFoundException($"'{Shown(key)}' names no loaded registry version; registry adapters are served on /v1/completions and /v1/chat/completions");
        var r = RegistryRef.Parse(key[..hash]);
        try
        {
            var entry = reader.Find(r.Name, r.Version ?? 0) is { } found && found.Sha256 == key[(hash + 1)..] ? found
                : throw new KeyNotFoundException($"{key[..hash]} is no longer registered with this content");
            try { return reader.Checkout(entry); }
            catch (LoraKitException e)
            {
                throw new AdapterUnavailableException($"adapter {entry.Ref} cannot be read from the registry: {e.Message} " +
                    $"(add the same adapter again to repair it, or move the alias to another version)");
            }
        }
        catch (Microsoft.Data.Sqlite.SqliteException e) // the database itself (locked past the busy timeout, damaged): not the request's fault
        {
            throw new AdapterUnavailableException($"adapter {key[..hash]} cannot be read from the registry right now: {e.Message.ReplaceLineEndings(" ")}");
        }
    }

    /// <summary>
    /// /v1/models entries (vLLM's shape: <c>root</c> the immutable version, <c>parent</c> the base model) for every alias
    /// (<c>NAME@ALIAS</c>) and for every aliased version and each name's <see cref="NewestListed"/> newest
    /// (<c>NAME@VERSION</c>), at most <see cref="MaxListedVersions"/> versions; <c>lorakit</c> says which version each is
    /// and, when the registry recorded its lineage, the version it was trained from (<c>parent_version</c>).
    /// </summary>
    public IEnumerable<JsonObject> Listing()
    {
        var entries = reader.Listed(NewestListed, MaxListedVersions);
        var byRef = entries.ToDictionary(e => e.Ref);
        var parents = reader.Parents(entries);
        foreach (var a in reader.Aliases(limit: MaxListedVersions))
            if (byRef.TryGetValue($"{a.Name}@{a.Version}", out var e)) yield return Entry($"{a.Name}@{a.Alias}", e, a.Alias, parents.GetValueOrDefault(e.Ref));
        foreach (var e in entries) yield return Entry(e.Ref, e, null, parents.GetValueOrDefault(e.Ref));
    }

    // "parent" is vLLM's field (the base model an adapter runs on); the adapter it was trained from is lorakit.parent_version.
    JsonObject Entry(string id, RegistryEntry e, string? alias, string? parentVersion) => new()
    {
        ["id"] = id, ["object"] = "model", ["created"] = Created(e.Created), ["owned_by"] = "lorakit", ["root"] = e.Ref, ["parent"] = baseName,
        ["lorakit"] = new JsonObject
        {
            ["name"] = e.Name, ["version"] = e.Version, ["alias"] = alias, ["sha256"] = e.Sha256,
            ["base_fingerprint"] = e.BaseFingerprint, ["base_model"] = e.BaseModel, ["parent_version"] = parentVersion,
        },
    };

    static long Created(string iso) =>
        DateTimeOffset.TryParse(iso, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal, out var t) ? t.ToUnixTimeSeconds() : 0;

    /// <summary>Whether the version's config is a sequence-classification adapter (served on /v1/classify, not for generation).</summary>
    public static bool IsClassifier(RegistryEntry e)
    {
        try { return JsonNode.Parse(e.Config) is JsonObject o && o["task_type"] is JsonValue v && v.TryGetValue<string>(out var t) && t == "SEQ_CLS"; }
        catch (System.Text.Json.JsonException) { return false; }
    }

    static string Shown(string s) => Serving.AdapterRegistry.Shown(s);

    /// <summary>Closes the registry's connections.</summary>
    public void Dispose() => reader.Dispose();
}

/// <summary>A registered adapter whose stored files are missing or damaged: the server answers 503 naming the version.</summary>
public sealed class AdapterUnavailableException(string message) : Exception(message);
