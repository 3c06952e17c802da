using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using LoraKit.IO;

namespace LoraKit.Evaluation;

/// <summary>
/// Reads a suite file (docs/suites.md has the format): JSONL, one case per line, blank lines allowed. Suites are
/// untrusted input, so the file's size, each line's length, the number of cases and JSON nesting are bounded, a file
/// that cannot be opened promptly (a named pipe with no writer) is refused after a few seconds, and every problem —
/// unknown fields and kinds included — is one <see cref="SuiteException"/> line <c>FILE:LINE: field 'x': problem</c>
/// (FILE as the caller gave it). Nothing else escapes: the fuzz suite (FuzzSuitesTests) holds it to that.
/// </summary>
internal static class SuiteReader
{
    /// <summary>The largest suite file read (100,000 cases of a few hundred bytes fit many times over).</summary>
    public const long MaxFileBytes = 64L << 20;
    /// <summary>The longest line (a case); a perplexity text longer than this is far past any model's context.</summary>
    public const int MaxLineBytes = 1 << 20;
    public const int MaxCases = 100_000;
    /// <summary>A case nests at most four levels (case, messages, turn); deeper JSON is refused before it is walked.</summary>
    public const int MaxJsonDepth = 16;
    /// <summary>How long opening may take before the file is taken for a pipe nobody writes to.</summary>
    public static readonly TimeSpan OpenTimeout = TimeSpan.FromSeconds(5);

    static readonly JsonDocumentOptions JsonOptions = new() { AllowDuplicateProperties = false, MaxDepth = MaxJsonDepth };
    static readonly UTF8Encoding StrictUtf8 = new(false, throwOnInvalidBytes: true);

    /// <summary>A suite file, or a built-in suite ("lorakit:capability", "lorakit:safety@v1": see <see cref="BuiltinSuites"/>).</summary>
    public static EvalSuite Load(string path)
    {
        if (BuiltinSuites.IsBuiltin(path)) return BuiltinSuites.Load(path);
        return Parse(ReadFile(path), path, Path.GetFileName(path));
    }

    /// <summary>
    /// Parses a suite's bytes. <paramref name="source"/> names it in messages (the path as given); <paramref name="fileName"/>
    /// gives the suite's name (without extension) and each case's <see cref="EvalCase.Where"/>.
    /// </summary>
    public static EvalSuite Parse(byte[] bytes, string source, string fileName)
    {
        if (bytes.LongLength > MaxFileBytes) throw new SuiteException($"{source}: {bytes.LongLength:N0} bytes, more than the {MaxFileBytes:N0} bytes of a suite file");
        string sha256 = Convert.ToHexStringLower(SHA256.HashData(bytes));
        var cases = new List<EvalCase>();
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var (lineNo, text) in Lines(bytes, source))
        {
            if (string.IsNullOrWhiteSpace(text)) continue;
            if (cases.Count == MaxCases) throw new SuiteException($"{source}:{lineNo}: more than {MaxCases:N0} cases; split the suite into several files");
            var c = CaseParser.Parse(text, new CaseParser.Place(source, lineNo, $"{fileName}:{lineNo}"), JsonOptions);
            if (ids.TryGetValue(c.Id, out int first))
                throw new SuiteException($"{source}:{lineNo}: field 'id': '{c.Id}' is already the id of line {first}; ids must be unique in a suite");
            ids[c.Id] = lineNo;
            cases.Add(c);
        }
        if (cases.Count == 0) throw new SuiteException($"{source}: no cases (a suite is JSONL: one case object per line)");
        return new EvalSuite(source, Path.GetFileNameWithoutExtension(fileName), sha256, cases);
    }

    /// <summary>The file's bytes: regular files only, bounded in size, every read problem one line naming the file.</summary>
    static byte[] ReadFile(string path)
    {
        if (string.IsNullOrWhiteSpace(path)) throw new SuiteException("suite path is empty; give a JSONL file or a built-in suite (lorakit:capability, lorakit:safety)");
        if (Directory.Exists(path)) throw new SuiteException($"{path}: is a directory; give a suite file (JSONL, one case per line)");
        try
        {
            // A pipe, socket or terminal may never end (refused); a device such as /dev/zero is seekable and stopped by the size bound.
            using var fs = FileProblem.OpenPromptly(path, OpenTimeout);
            return FileProblem.ReadAllBytes(fs, path, MaxFileBytes);
        }
        catch (LoraKitException e) when (e is not SuiteException) { throw new SuiteException(e.Message); }
    }

    /// <summary>
    /// The lines (1-based) decoded strictly: a UTF-8 BOM at the start is skipped, CRLF is read, a line that is not valid
    /// UTF-8 or is longer than <see cref="MaxLineBytes"/> is an error naming it.
    /// </summary>
    static IEnumerable<(int line, string text)> Lines(byte[] bytes, string source)
    {
        int start = bytes.AsSpan().StartsWith(Encoding.UTF8.Preamble) ? 3 : 0, lineNo = 0;
        while (start < bytes.Length)
        {
            lineNo++;
            int nl = Array.IndexOf(bytes, (byte)'\n', start);
            int end = nl < 0 ? bytes.Length : nl;
            int len = end - start;
            if (len > 0 && bytes[end - 1] == '\r') len--;
            if (len > MaxLineBytes)
                throw new SuiteException($"{source}:{lineNo}: line of {len:N0} bytes, longer than the {MaxLineBytes:N0} a case may take; is this a JSONL file (one case per line)?");
            string text;
            try { text = StrictUtf8.GetString(bytes, start, len); }
            catch (DecoderFallbackException e) { throw new SuiteException($"{source}:{lineNo}: invalid UTF-8 (byte {Math.Max(0, e.Index) + 1} of the line); a suite file must be UTF-8 text"); }
            yield return (lineNo, text);
            if (nl < 0) yield break;
            start = nl + 1;
        }
    }
}
