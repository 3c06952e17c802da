using System.Text.RegularExpressions;

namespace LoraKit.Hub;

/// <summary>
/// A hub model id <c>ORG/NAME[@REVISION]</c> (revision: a branch, tag or 40-hex commit; default <c>main</c>), checked as
/// <c>huggingface_hub</c> checks repo ids (letters, digits, <c>-_.</c>; no <c>--</c> or <c>..</c>; at most 96 characters),
/// so a name can never reach outside its cache folder. A local path (./x, /x, a/b/c) never parses as one.
/// </summary>
public sealed partial record HubRepoId(string Repo, string Revision)
{
    /// <summary>The revision when none is given.</summary>
    public const string DefaultRevision = "main";

    [GeneratedRegex(@"^\w(?:[\w.\-]*\w)?/\w(?:[\w.\-]*\w)?$", RegexOptions.ECMAScript)]
    private static partial Regex RepoPattern();

    [GeneratedRegex("^[0-9a-f]{40}$")]
    private static partial Regex CommitPattern();

    /// <summary>The cache folder name, as <c>huggingface_hub</c> names it: <c>models--ORG--NAME</c>.</summary>
    public string FolderName => "models--" + Repo.Replace("/", "--", StringComparison.Ordinal);

    /// <summary>Whether the revision is a commit sha (then no refs file names it).</summary>
    public bool IsCommit => IsCommitSha(Revision);

    /// <inheritdoc/>
    public override string ToString() => Revision == DefaultRevision ? Repo : $"{Repo}@{Revision}";

    /// <summary>True for a 40-hex (lower-case) commit sha.</summary>
    public static bool IsCommitSha(string s) => CommitPattern().IsMatch(s);

    /// <summary>Parses <paramref name="value"/>, or returns null when it is not shaped like a hub id (a local path, a registry name).</summary>
    public static HubRepoId? TryParse(string value)
    {
        int at = value.IndexOf('@');
        string repo = at < 0 ? value : value[..at];
        string revision = at < 0 ? DefaultRevision : value[(at + 1)..];
        if (repo.Length > 96 || !RepoPattern().IsMatch(repo) || repo.Contains("--", StringComparison.Ordinal)
            || repo.Contains("..", StringComparison.Ordinal) || repo.EndsWith(".git", StringComparison.Ordinal)) return null;
        return IsSafeRevision(revision) ? new HubRepoId(repo, revision) : null;
    }

    /// <summary>Parses <paramref name="value"/> or throws a <see cref="HubException"/> saying what a hub id looks like.</summary>
    public static HubRepoId Parse(string value) => TryParse(value)
        ?? throw new HubException($"'{value}' is not a Hugging Face hub id: expected ORG/NAME or ORG/NAME@REVISION (letters, digits, '-', '_', '.')");

    /// <summary>
    /// A revision that is safe as a path under refs/ and in a URL: git ref characters, segments that are not empty,
    /// <c>.</c> or <c>..</c>, no backslash or control character.
    /// </summary>
    static bool IsSafeRevision(string r) => r.Length is > 0 and <= 200
        && r.All(c => c > ' ' && c < 127 && c is not ('\\' or ':' or '?' or '*' or '[' or '~' or '^' or '@'))
        && r.Split('/').All(s => s.Length > 0 && s is not "." and not "..");
}
