using System.CommandLine;
using LoraKit.Registry;

namespace LoraKit.Cli.Commands;

/// <summary>
/// An <c>--adapter</c> value: a PEFT adapter directory, or a registered adapter <c>NAME@VERSION</c> / <c>NAME@ALIAS</c>
/// / <c>NAME</c> (NAME@production when that alias exists, else the latest version) in the registry of
/// <c>--registry</c>, else <c>LORAKIT_REGISTRY</c>, else ~/.lorakit/registry. A directory that exists always wins; a
/// name is looked up only in a registry that exists (a typo never creates one). A Hugging Face hub id <c>ORG/NAME[@REVISION]</c> (one '/',
/// which registry names never have) is downloaded into the hub cache (<see cref="ModelArgument"/>).
/// </summary>
public static class AdapterArgument
{
    /// <summary>The --registry option of commands that take adapters.</summary>
    public static Option<string?> RegistryOption() =>
        new("--registry") { Description = $"adapter registry for NAME@VERSION / NAME@ALIAS adapters (default: ${AdapterStore.EnvVar}, else ~/.lorakit/registry)" };

    /// <summary>The adapter directory <paramref name="value"/> stands for.</summary>
    public static string Resolve(string value, string? registry) => ResolveVersion(value, registry).Dir;

    /// <summary>
    /// The adapter directory <paramref name="value"/> stands for and, when it named a registered adapter, that version
    /// (its NAME@VERSION, never the alias it was reached by, is what records of it keep).
    /// </summary>
    public static (string Dir, AdapterVersion? Version) ResolveVersion(string value, string? registry)
    {
        if (Directory.Exists(value) || File.Exists(value)) return (value, null);
        if (value.Count(c => c == '/') == 1 && ModelArgument.ResolveAdapter(value) is { } snapshot) return (snapshot, null); // ORG/NAME[@REV]; a registry name has no '/'
        string root = Path.GetFullPath(registry ?? AdapterStore.DefaultPath());
        bool looksLikeName = value.Length > 0 && value.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-' or '@');
        if (!looksLikeName || !File.Exists(Path.Combine(root, AdapterStore.DbFile)))
            throw new LoraKitException($"adapter directory '{value}' does not exist" +
                (looksLikeName ? $" (and there is no registry at {root} to look it up as NAME@VERSION)" : ""));
        using var store = AdapterStore.Open(root);
        var (v, dir) = store.Checkout(value);
        Console.Error.WriteLine($"adapter {value} = {v.Ref} (sha256 {v.Sha256[..12]}) from the registry at {root}");
        return (dir, v);
    }
}
