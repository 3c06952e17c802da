using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraKit.Hub;

/// <summary>
/// Which files of a repository a download needs: for a model its configuration, tokenizer files and safetensors weights
/// (the shards the index names when there is an index, else model.safetensors); for an adapter its
/// adapter_config.json and adapter_model.safetensors; or the files matching glob patterns (<c>*</c>, <c>?</c>, as
/// <c>huggingface_hub</c>'s allow_patterns: <c>*</c> matches across <c>/</c>). Nothing else is fetched (no
/// pytorch_model.bin, no README, no other formats).
/// </summary>
public sealed class HubFileSet
{
    /// <summary>The weight index, whose weight_map names the shards.</summary>
    public const string Index = "model.safetensors.index.json";

    static readonly string[] ModelFiles = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"];
    static readonly string[] AdapterFiles = ["adapter_config.json", "adapter_model.safetensors", "labels.json"];

    readonly string _kind;
    readonly Regex[] _globs;

    HubFileSet(string kind, Regex[] globs) { _kind = kind; _globs = globs; }

    /// <summary>A model: config, tokenizer and safetensors weights.</summary>
    public static HubFileSet Model { get; } = new("model", []);
    /// <summary>A PEFT adapter.</summary>
    public static HubFileSet Adapter { get; } = new("adapter", []);
    /// <summary>A model, or an adapter when the repository holds adapter_config.json and no config.json.</summary>
    public static HubFileSet Auto { get; } = new("auto", []);

    /// <summary>The files matching any of <paramref name="patterns"/>.</summary>
    public static HubFileSet Matching(IEnumerable<string> patterns) =>
        new("include", [.. patterns.Select(p => new Regex("^" + Regex.Escape(p).Replace(@"\*", ".*").Replace(@"\?", ".") + "$", RegexOptions.CultureInvariant))]);

    /// <summary>The files to fetch first, from the repository's <paramref name="files"/>; throws when a needed one is missing.</summary>
    public IReadOnlyList<string> Pick(HubRepoId id, IReadOnlyList<string> files)
    {
        var present = files.ToHashSet(StringComparer.Ordinal);
        switch (KindFor(present))
        {
            case "include":
                var matched = files.Where(f => _globs.Any(g => g.IsMatch(f))).ToList();
                return matched.Count > 0 ? matched : throw new HubNotFoundException($"{id}: no file matches --include {string.Join(" ", _globs.Select(g => g.ToString()))}");
            case "adapter":
                foreach (var f in AdapterFiles.Take(2))
                    if (!present.Contains(f)) throw new HubNotFoundException($"{id}: the repository has no {f}, so it is not a PEFT adapter (safetensors)");
                return [.. AdapterFiles.Where(present.Contains)];
            default:
                if (!present.Contains("config.json"))
                    throw new HubNotFoundException($"{id}: the repository has no config.json, so it is not a model in Hugging Face layout" +
                        (present.Contains("adapter_config.json") ? " (it is an adapter: pass it as --adapter)" : ""));
                string weights = present.Contains(Index) ? Index : present.Contains("model.safetensors") ? "model.safetensors"
                    : throw new HubNotFoundException($"{id}: the repository has no model.safetensors or {Index} (LoraKit reads safetensors weights only)");
                return [.. ModelFiles.Where(present.Contains), weights];
        }
    }

    /// <summary>The shards a downloaded index names (checked to stay inside the snapshot), once the index is in <paramref name="snapshot"/>.</summary>
    public static IReadOnlyList<string> Shards(HubRepoId id, string snapshot)
    {
        var path = Path.Combine(snapshot, Index);
        if (!File.Exists(path)) return [];
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
            return [.. doc.RootElement.GetProperty("weight_map").EnumerateObject().Select(p => HubCache.RequireSafeFileName(p.Value.GetString() ?? "")).Distinct()];
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw new HubIntegrityException($"{id}: {Index} has no weight_map of file names: {e.Message.Split('\n')[0]}");
        }
    }

    /// <summary>
    /// Whether <paramref name="snapshot"/> already holds what this set needs (used without the network: the cached
    /// snapshot of a pinned commit, offline mode, or a hub that cannot be reached).
    /// </summary>
    public bool IsCompleteIn(HubRepoId id, string snapshot)
    {
        bool Has(string f) => File.Exists(Path.Combine(snapshot, f)); // follows the symlink: a dangling one is missing
        if (!Directory.Exists(snapshot)) return false;
        var marker = new HashSet<string>(new[] { "config.json", "adapter_config.json" }.Where(Has));
        return KindFor(marker) switch
        {
            "include" => Directory.EnumerateFiles(snapshot, "*", SearchOption.AllDirectories)
                .Any(f => _globs.Any(g => g.IsMatch(Path.GetRelativePath(snapshot, f).Replace('\\', '/')))),
            "adapter" => AdapterFiles.Take(2).All(Has),
            _ => Has("config.json") && (Has(Index) ? Shards(id, snapshot).All(Has) : Has("model.safetensors")),
        };
    }

    string KindFor(IReadOnlySet<string> present) => _kind == "auto"
        ? (present.Contains("adapter_config.json") && !present.Contains("config.json") ? "adapter" : "model") : _kind;
}
