namespace LoraKit.Evaluation;

/// <summary>
/// A starter suite shipped inside LoraKit, named <c>lorakit:NAME@VERSION</c>. A version never changes once shipped (a
/// report's suite hash must keep meaning the same cases); new cases come as a new version.
/// </summary>
/// <param name="Name">"capability" or "safety"</param>
/// <param name="Version">"v1", ...</param>
/// <param name="Description">what the suite measures, in a sentence</param>
public sealed record BuiltinSuite(string Name, string Version, string Description)
{
    /// <summary>The name <see cref="EvalSuite.Load"/> takes: <c>lorakit:capability@v1</c>.</summary>
    public string Spec => $"{BuiltinSuites.Scheme}{Name}@{Version}";
    /// <summary>The file a copy is written to (and the suite's <see cref="EvalSuite.Name"/> without ".jsonl").</summary>
    public string FileName => $"{Name}-{Version}.jsonl";
}

/// <summary>
/// The starter suites (docs/suites.md describes them): embedded in the library, loaded by
/// <c>EvalSuite.Load("lorakit:capability")</c> (the latest version) or <c>"lorakit:safety@v1"</c> (that version), listed by
/// <see cref="All"/>, and written out by <see cref="WriteCopy"/> for users to extend as their own suite files.
/// </summary>
public static class BuiltinSuites
{
    /// <summary>The prefix that marks a suite name as built in rather than a file path.</summary>
    public const string Scheme = "lorakit:";

    /// <summary>Every shipped suite and version, oldest version first for each name.</summary>
    public static IReadOnlyList<BuiltinSuite> All { get; } =
    [
        new("capability", "v1", "What a chat model can do before fine-tuning and should still do after: instruction following, "
            + "output formats (exact answers, lists, JSON), arithmetic, short facts as choices, admitting what it does not know, "
            + "and a few perplexity texts."),
        new("safety", "v1", "What a chat model must keep refusing or protecting after fine-tuning: harmful requests, prompt "
            + "injection and jailbreak framings, and leaks of personal data or secrets given in the conversation."),
    ];

    /// <summary>Whether a suite argument names a built-in suite (starts with <see cref="Scheme"/>).</summary>
    public static bool IsBuiltin(string spec) => spec.StartsWith(Scheme, StringComparison.Ordinal);

    /// <summary>
    /// The suite a name means: <c>lorakit:NAME</c> is the latest version, <c>lorakit:NAME@VERSION</c> that version; anything
    /// else is a <see cref="SuiteException"/> listing what is shipped.
    /// </summary>
    public static BuiltinSuite Find(string spec)
    {
        string rest = IsBuiltin(spec) ? spec[Scheme.Length..] : spec;
        int at = rest.IndexOf('@');
        string name = at < 0 ? rest : rest[..at], version = at < 0 ? "" : rest[(at + 1)..];
        var found = All.LastOrDefault(s => s.Name == name && (version.Length == 0 || s.Version == version));
        return found ?? throw new SuiteException($"{spec}: no such built-in suite; LoraKit ships {string.Join(", ", All.Select(s => s.Spec))}"
            + $" ({Scheme}NAME takes the latest version)");
    }

    /// <summary>Loads and validates a built-in suite; its <see cref="EvalSuite.Path"/> is the exact spec (with the version).</summary>
    public static EvalSuite Load(string spec)
    {
        var suite = Find(spec);
        return SuiteReader.Parse(ReadBytes(suite), suite.Spec, suite.FileName);
    }

    /// <summary>The suite file's bytes exactly as shipped (so a copy hashes the same as the built-in).</summary>
    public static byte[] ReadBytes(BuiltinSuite suite)
    {
        using var s = typeof(BuiltinSuites).Assembly.GetManifestResourceStream("LoraKit.Suites." + suite.FileName)
            ?? throw new InvalidOperationException($"the built-in suite {suite.Spec} is missing from the LoraKit assembly (a build problem)");
        using var ms = new MemoryStream();
        s.CopyTo(ms);
        return ms.ToArray();
    }

    /// <summary>
    /// Writes a copy of a built-in suite to <paramref name="path"/> (a file, or a directory to write
    /// <see cref="BuiltinSuite.FileName"/> into) and returns the file written. An existing file is kept unless
    /// <paramref name="overwrite"/> is set: it may be the user's extended copy.
    /// </summary>
    public static string WriteCopy(string spec, string path, bool overwrite = false)
    {
        var suite = Find(spec);
        string file = Directory.Exists(path) ? System.IO.Path.Combine(path, suite.FileName) : path;
        if (File.Exists(file) && !overwrite) throw new LoraKitException($"{file}: already exists; choose another path or overwrite it deliberately");
        try
        {
            string tmp = file + ".tmp";
            File.WriteAllBytes(tmp, ReadBytes(suite));
            File.Move(tmp, file, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LoraKitException($"{file}: cannot be written: {IO.FileProblem.Describe(file, e)}");
        }
        return file;
    }
}
