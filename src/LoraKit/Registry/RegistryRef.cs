using System.Text.RegularExpressions;

namespace LoraKit.Registry;

/// <summary>
/// A reference to a registered adapter: <c>NAME@VERSION</c> (digits), <c>NAME@ALIAS</c>, or a plain <c>NAME</c> (which
/// <see cref="AdapterStore.Resolve"/> reads as <c>NAME@production</c> when that alias exists, else the latest version).
/// Names and aliases are 1–100 of [A-Za-z0-9._-]; an alias is not all digits (it would read as a version).
/// </summary>
public sealed partial record RegistryRef(string Name, int? Version, string? Alias)
{
    /// <summary>The alias a plain name means when it exists.</summary>
    public const string DefaultAlias = "production";

    [GeneratedRegex(@"^[A-Za-z0-9._-]{1,100}\z")] // \z, not $: "$" also matches before a final "\n", letting "name\n" through
    private static partial Regex NamePattern();

    /// <summary>Parses <paramref name="text"/>; a malformed reference is a one-line <see cref="LoraKitException"/>.</summary>
    public static RegistryRef Parse(string text)
    {
        int at = text.IndexOf('@');
        string name = at < 0 ? text : text[..at];
        CheckName(name);
        if (at < 0) return new(name, null, null);
        string r = text[(at + 1)..];
        if (r.Length > 0 && r.All(char.IsAsciiDigit))
            return int.TryParse(r, out int v) && v > 0 ? new(name, v, null) : throw new LoraKitException($"registry: '{Clip(text)}': version must be a positive number");
        CheckAlias(r);
        return new(name, null, r);
    }

    /// <summary>Throws unless <paramref name="name"/> is a valid adapter name.</summary>
    public static void CheckName(string name)
    {
        if (!NamePattern().IsMatch(name))
            throw new LoraKitException($"registry: adapter name '{Clip(name)}' is not valid (1-100 characters of A-Z a-z 0-9 . _ -)");
    }

    /// <summary>Throws unless <paramref name="alias"/> is a valid alias.</summary>
    public static void CheckAlias(string alias)
    {
        if (!NamePattern().IsMatch(alias) || alias.All(char.IsAsciiDigit))
            throw new LoraKitException($"registry: alias '{Clip(alias)}' is not valid (1-100 characters of A-Z a-z 0-9 . _ -, not all digits)");
    }

    /// <summary>User text quoted in an error: one short line.</summary>
    internal static string Clip(string s)
    {
        var clean = new string(s.Select(ch => char.IsControl(ch) ? ' ' : ch).ToArray());
        return clean.Length <= 120 ? clean : clean[..120] + "…";
    }

    /// <inheritdoc/>
    public override string ToString() => Version is { } v ? $"{Name}@{v}" : Alias is { } a ? $"{Name}@{a}" : Name;
}
