namespace LoraKit.Evaluation;

/// <summary>
/// A suite file (JSONL, one case per line) as loaded: its path, name (the file name without extension), the sha256
/// of its bytes (reports record it, so a result names exactly what was run) and its cases in file order.
/// </summary>
public sealed record EvalSuite(string Path, string Name, string Sha256, IReadOnlyList<EvalCase> Cases)
{
    /// <summary>Reads and validates a suite; every problem is a <see cref="SuiteException"/> naming <c>file:line</c>.</summary>
    public static EvalSuite Load(string path) => SuiteReader.Load(path);
}

/// <summary>A problem in a suite file; the message names the file and line.</summary>
public sealed class SuiteException(string message) : LoraKitException(message);
