using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using LoraKit.Evaluation;
using LoraKit.Templating;
using LoraKit.Tokenization;

namespace LoraKit.Tests.Evaluation;

/// <summary>
/// Suite files as users write them: every field read as documented (docs/suites.md), and every problem one
/// <c>FILE:LINE: field 'x': problem</c> line — checked on real files, with the bad case placed after a good one and a
/// blank line so the line count is tested too.
/// </summary>
public class SuiteReaderTests
{
    const string Good = """{"id": "ok", "kind": "task", "prompt": "Say hi.", "expect": {"contains": "hi"}}""";

    static string Write(string text, string name = "suite.jsonl")
    {
        var path = Path.Combine(Fixtures.TempDir(), name);
        File.WriteAllText(path, text);
        return path;
    }

    static SuiteException Refused(string path, params string[] fragments)
    {
        var e = Assert.Throws<SuiteException>(() => EvalSuite.Load(path));
        Assert.DoesNotContain('\n', e.Message);
        foreach (var f in fragments) Assert.Contains(f, e.Message);
        return e;
    }

    [Fact]
    public void EveryFieldIsRead()
    {
        var text = string.Join("\n",
            """{"id": "t1", "kind": "task", "prompt": "2+2=", "expect": {"equals": "4"}, "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": -5}""",
            "",
            """{"id": "c1", "kind": "capability", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}], "expect": {"contains": ["Paris"]}}""",
            "   ",
            """{"id": "s1", "kind": "safety", "messages": [{"role": "user", "content": "x"}], "expect": {"choices": ["no", "yes"], "answer": 0}}""",
            """{"id": "p1", "kind": "capability", "text": "The quick brown fox."}""",
            """{"id": "l1", "kind": "task", "prompt": "refund please", "expect": {"label": "billing"}}""") + "\n";
        var path = Write(text, "my-suite.jsonl");
        var suite = EvalSuite.Load(path);

        Assert.Equal(path, suite.Path);
        Assert.Equal("my-suite", suite.Name);
        Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(path))), suite.Sha256);
        Assert.Equal(["t1", "c1", "s1", "p1", "l1"], suite.Cases.Select(c => c.Id));
        Assert.Equal(["my-suite.jsonl:1", "my-suite.jsonl:3", "my-suite.jsonl:5", "my-suite.jsonl:6", "my-suite.jsonl:7"], suite.Cases.Select(c => c.Where));

        var t = suite.Cases[0];
        Assert.Equal((CaseKind.Task, "2+2=", 8, 0.7, 0.9, (long?)-5), (t.Kind, t.Prompt, t.MaxTokens, t.Temperature, t.TopP, t.Seed));
        Assert.Equal("4", Assert.IsType<EqualsExpectation>(t.Expect).Value);

        var c = suite.Cases[1];
        Assert.Equal(CaseKind.Capability, c.Kind);
        Assert.Equal([new ChatTurn("system", "Be brief."), new ChatTurn("user", "Capital of France?")], c.Messages);
        Assert.Equal((EvalCase.DefaultMaxTokens, 0.0, 1.0, (long?)null), (c.MaxTokens, c.Temperature, c.TopP, c.Seed));
        Assert.True(c.IsGenerated);

        Assert.Equal(CaseKind.Safety, suite.Cases[2].Kind);
        Assert.False(suite.Cases[2].IsGenerated);
        Assert.True(suite.Cases[3].IsPerplexity);
        Assert.Null(suite.Cases[3].Expect);
        Assert.IsType<LabelExpectation>(suite.Cases[4].Expect);
    }

    [Fact]
    public void ByteOrderMarkAndCrlfAreRead()
    {
        var path = Path.Combine(Fixtures.TempDir(), "crlf.jsonl");
        File.WriteAllBytes(path, [.. Encoding.UTF8.Preamble, .. Encoding.UTF8.GetBytes(Good + "\r\n\r\n" + Good.Replace("\"ok\"", "\"ok2\"") + "\r\n")]);
        var suite = EvalSuite.Load(path);
        Assert.Equal(["crlf.jsonl:1", "crlf.jsonl:3"], suite.Cases.Select(c => c.Where));
    }

    /// <summary>A bad case at line 3 (after a good case and a blank line): the field named and the problem said.</summary>
    [Theory]
    // the line itself
    [InlineData("""{"id": "x", """, null, "not valid JSON")]
    [InlineData("""[1, 2]""", null, "a case must be a JSON object, got an array")]
    [InlineData("""{"id": "x", "id": "y", "kind": "task", "prompt": "p", "expect": {"json": true}}""", null, "not valid JSON")]
    // unknown fields and kinds
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "max_token": 5}""", "max_token", "unknown field")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expected": {"json": true}}""", "expected", "unknown field")]
    [InlineData("""{"id": "x", "kind": "regression", "prompt": "p", "expect": {"json": true}}""", "kind", "unknown kind \"regression\"")]
    [InlineData("""{"id": "x", "kind": "Task", "prompt": "p", "expect": {"json": true}}""", "kind", "unknown kind")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"startswith": "a"}}""", "expect.startswith", "unknown field")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [{"role": "user", "content": "c", "name": "n"}], "expect": {"json": true}}""", "messages[0].name", "unknown field")]
    // id and kind
    [InlineData("""{"kind": "task", "prompt": "p", "expect": {"json": true}}""", "id", "missing")]
    [InlineData("""{"id": "", "kind": "task", "prompt": "p", "expect": {"json": true}}""", "id", "is empty")]
    [InlineData("""{"id": 5, "kind": "task", "prompt": "p", "expect": {"json": true}}""", "id", "must be a string, got a number (5)")]
    [InlineData("""{"id": "a\u0007b", "kind": "task", "prompt": "p", "expect": {"json": true}}""", "id", "control character")]
    [InlineData("""{"id": "ok", "kind": "task", "prompt": "p", "expect": {"json": true}}""", "id", "already the id of line 1")]
    [InlineData("""{"id": "x", "prompt": "p", "expect": {"json": true}}""", "kind", "missing")]
    [InlineData("""{"id": "x", "kind": null, "prompt": "p", "expect": {"json": true}}""", "kind", "must be a string, got null")]
    // the input: exactly one of prompt / messages / text
    [InlineData("""{"id": "x", "kind": "task", "expect": {"json": true}}""", "prompt", "exactly one of 'prompt', 'messages' or 'text'")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "text": "t", "expect": {"json": true}}""", "text", "not 'prompt' and 'text'")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "", "expect": {"json": true}}""", "prompt", "is empty")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": ["p"], "expect": {"json": true}}""", "prompt", "must be a string, got an array")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [], "expect": {"json": true}}""", "messages", "non-empty array")]
    [InlineData("""{"id": "x", "kind": "task", "messages": "hi", "expect": {"json": true}}""", "messages", "got a string")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [5], "expect": {"json": true}}""", "messages[0]", "got a number")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [{"role": "human", "content": "c"}], "expect": {"json": true}}""", "messages[0].role", "unknown role \"human\"")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [{"role": "user"}], "expect": {"json": true}}""", "messages[0].content", "missing")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [{"role": "user", "content": 1}], "expect": {"json": true}}""", "messages[0].content", "must be a string")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "a"}], "expect": {"json": true}}""", "messages[1].role", "the last message is the assistant's")]
    [InlineData("""{"id": "x", "kind": "task", "messages": [{"role": "system", "content": "s"}], "expect": {"json": true}}""", "messages[0].role", "the last message is the system's")]
    [InlineData("""{"id": "x", "kind": "tâche", "prompt": "p", "expect": {"json": true}}""", "kind", "unknown kind \"tâche\"")]
    // perplexity cases
    [InlineData("""{"id": "x", "kind": "capability", "text": "t", "expect": {"json": true}}""", "expect", "perplexity case")]
    [InlineData("""{"id": "x", "kind": "capability", "text": "t", "max_tokens": 5}""", "max_tokens", "perplexity case")]
    [InlineData("""{"id": "x", "kind": "capability", "text": "  "}""", "text", "is empty")]
    // expect
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p"}""", "expect", "missing")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": "42"}""", "expect", "must be an object")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {}}""", "expect", "empty; give one of")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"equals": "a", "contains": "a"}}""", "expect.contains", "one expectation per case")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"equals": 42}}""", "expect.equals", "must be a string, got a number (42)")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"equals": " "}}""", "expect.equals", "is empty")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"contains": []}}""", "expect.contains", "non-empty array of strings, got an empty array")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"contains": ["a", 1]}}""", "expect.contains[1]", "must be a string")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"not_contains": "a"}}""", "expect.not_contains", "non-empty array of strings, got a string")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"not_contains": ["a", ""]}}""", "expect.not_contains[1]", "is empty")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"regex": "(unclosed"}}""", "expect.regex", "not a valid .NET regex: insufficient closing parentheses at offset 9")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"regex": "a{2,1}"}}""", "expect.regex", "not a valid .NET regex: reversed quantifier range")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": false}}""", "expect.json", "must be true")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": "yes"}}""", "expect.json", "must be true")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"label": ""}}""", "expect.label", "is empty")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"rubric": 1}}""", "expect.rubric", "must be a string")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", "b"]}}""", "expect.answer", "missing")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a"], "answer": 0}}""", "expect.choices", "at least 2")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", "a"], "answer": 0}}""", "expect.choices", "listed twice")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", ""], "answer": 0}}""", "expect.choices[1]", "is empty")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", "b"], "answer": 2}}""", "expect.answer", "index from 0 to 1")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", "b"], "answer": -1}}""", "expect.answer", "got a number (-1)")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", "b"], "answer": 0.5}}""", "expect.answer", "index from 0 to 1")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", "b"], "answer": "0"}}""", "expect.answer", "got a string")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"answer": 0}}""", "expect.choices", "'answer' needs 'choices'")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"equals": "a", "answer": 0}}""", "expect.answer", "goes with 'choices'")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": ["a", "b"], "answer": 0}, "max_tokens": 5}""", "max_tokens", "scored without generating")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"label": "a"}, "temperature": 1}""", "temperature", "scored without generating")]
    // generation settings
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "max_tokens": 0}""", "max_tokens", "an integer from 1 to 4096, got a number (0)")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "max_tokens": 4097}""", "max_tokens", "from 1 to 4096")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "max_tokens": 1e30}""", "max_tokens", "got a number (1e30)")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "max_tokens": 8.5}""", "max_tokens", "from 1 to 4096")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "max_tokens": "64"}""", "max_tokens", "got a string")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "temperature": -0.1}""", "temperature", "a number from 0 to 100")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "temperature": 1e400}""", "temperature", "a number from 0 to 100")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "top_p": 0}""", "top_p", "above 0 up to 1")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "top_p": 1.01}""", "top_p", "above 0 up to 1")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "seed": 1.5}""", "seed", "64-bit integer")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "seed": 99999999999999999999}""", "seed", "64-bit integer")]
    [InlineData("""{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "seed": true}""", "seed", "got a boolean (true)")]
    public void EveryProblemNamesFileLineAndField(string badLine, string? field, string problem)
    {
        var path = Write(Good + "\n\n" + badLine + "\n");
        var e = Refused(path, problem);
        Assert.StartsWith(field is null ? $"{path}:3: " : $"{path}:3: field '{field}': ", e.Message);
    }

    [Fact]
    public void FileProblemsNameTheFile()
    {
        var dir = Fixtures.TempDir();
        Refused(Path.Combine(dir, "missing.jsonl"), "missing.jsonl: not found");
        Refused(dir, $"{dir}: is a directory");
        Refused(Write(""), "no cases");
        Refused(Write("\n  \n\r\n"), "no cases");
        var dangling = Path.Combine(dir, "dangling.jsonl");
        File.CreateSymbolicLink(dangling, Path.Combine(dir, "nowhere.jsonl"));
        Refused(dangling, "symbolic link", "does not exist");
        Refused("/dev/zero", "/dev/zero:", "bytes");
    }

    [Fact]
    public void InvalidUtf8NamesTheLine()
    {
        var path = Path.Combine(Fixtures.TempDir(), "latin1.jsonl");
        File.WriteAllBytes(path, [.. Encoding.UTF8.GetBytes(Good + "\n"), .. Encoding.Latin1.GetBytes("""{"id": "café", "kind": "task", "prompt": "p", "expect": {"json": true}}""")]);
        var e = Refused(path, $"{path}:2: invalid UTF-8");
    }

    [Fact]
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    public void AnUnreadableFileIsNamed()
    {
        var path = Write(Good);
        File.SetUnixFileMode(path, UnixFileMode.None);
        bool readable;
        try { File.ReadAllBytes(path); readable = true; } catch (UnauthorizedAccessException) { readable = false; }
        if (!readable) Refused(path, $"{path}: permission denied"); // running as root reads anything: nothing to test then
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
    }

    [Fact]
    public void ANamedPipeIsRefusedInBoundedTime()
    {
        var path = Path.Combine(Fixtures.TempDir(), "pipe.jsonl");
        using (var p = Process.Start("mkfifo", [path])) p.WaitForExit();
        Assert.True(File.Exists(path));
        var sw = Stopwatch.StartNew();
        Refused(path, path, "named pipe");
        Assert.True(sw.Elapsed < SuiteReader.OpenTimeout + TimeSpan.FromSeconds(5), $"took {sw.Elapsed}");
        // Release the reader left waiting on the pipe: opening the write end lets its open() return.
        using (new FileStream(path, FileMode.Open, FileAccess.Write)) { }
    }

    [Fact]
    public void LongLinesAndTooManyCasesAreBounded()
    {
        var longLine = Write(Good + "\n" + "{\"id\": \"" + new string('x', SuiteReader.MaxLineBytes) + "\"}\n");
        Refused(longLine, $"{longLine}:2: line of", "longer than");

        var sb = new StringBuilder();
        for (int i = 0; i <= SuiteReader.MaxCases; i++) sb.Append("{\"id\":\"").Append(i).Append("\",\"kind\":\"capability\",\"text\":\"t\"}\n");
        var many = Write(sb.ToString());
        Refused(many, $"{many}:{SuiteReader.MaxCases + 1}: more than 100,000 cases");
    }

    [Fact]
    public void DeepNestingIsRefusedAsJson()
    {
        var path = Write(Good + "\n{\"id\": " + new string('[', 5000) + new string(']', 5000) + "}\n");
        Refused(path, $"{path}:2: not valid JSON", "depth");
    }

    [Fact]
    public void AnEscapedLoneSurrogateIsNamed()
    {
        var path = Write(Good + "\n" + """{"id": "x", "kind": "task", "prompt": "\ud800", "expect": {"json": true}}""" + "\n");
        Refused(path, $"{path}:2: field 'prompt': not valid text");
    }

    // ---- built-in suites ----

    [Fact]
    public void BuiltinSuitesLoadByNameAndVersion()
    {
        Assert.Equal(["capability", "safety"], BuiltinSuites.All.Select(s => s.Name).Distinct().Order());
        foreach (var b in BuiltinSuites.All)
        {
            var suite = EvalSuite.Load(b.Spec);
            Assert.Equal(b.Spec, suite.Path);
            Assert.Equal(Path.GetFileNameWithoutExtension(b.FileName), suite.Name);
            Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(BuiltinSuites.ReadBytes(b))), suite.Sha256);
            Assert.All(suite.Cases, c => Assert.StartsWith(b.FileName + ":", c.Where));
        }
        var latest = BuiltinSuites.All.Last(s => s.Name == "capability");
        Assert.Equal(latest.Spec, EvalSuite.Load("lorakit:capability").Path);
        Assert.Equal("lorakit:safety@v1", EvalSuite.Load("lorakit:safety@v1").Path);
        var e = Assert.Throws<SuiteException>(() => EvalSuite.Load("lorakit:capabilty"));
        Assert.Contains("lorakit:capability@v1", e.Message);
        Assert.Throws<SuiteException>(() => EvalSuite.Load("lorakit:safety@v99"));
        Assert.Throws<SuiteException>(() => EvalSuite.Load("lorakit:"));
    }

    [Theory]
    [InlineData("capability", CaseKind.Capability)]
    [InlineData("safety", CaseKind.Safety)]
    public void BuiltinSuitesAreSmallChatSuitesOfTheirKind(string name, CaseKind kind)
    {
        var suite = EvalSuite.Load("lorakit:" + name);
        Assert.InRange(suite.Cases.Count, 20, 40);
        Assert.All(suite.Cases, c => Assert.Equal(kind, c.Kind));
        Assert.All(suite.Cases, c => Assert.True(c.Messages is not null || c.IsPerplexity, $"{c.Id}: chat suites use messages"));
        Assert.All(suite.Cases.Where(c => c.Expect is RegexExpectation), c => Assert.Equal(RegexExpectation.MatchTimeout, ((RegexExpectation)c.Expect!).Regex.MatchTimeout));
        var types = suite.Cases.Select(c => c.Expect?.GetType()).Where(t => t is not null).Distinct().ToList();
        if (kind == CaseKind.Capability)
            foreach (var t in new[] { typeof(EqualsExpectation), typeof(ContainsExpectation), typeof(NotContainsExpectation), typeof(RegexExpectation), typeof(JsonExpectation), typeof(ChoicesExpectation) })
                Assert.Contains(t, types);
        else
            foreach (var t in new[] { typeof(NotContainsExpectation), typeof(RegexExpectation), typeof(ChoicesExpectation) })
                Assert.Contains(t, types);
    }

    /// <summary>
    /// The built-in conversations are ones the published chat templates (re-typed in fixtures) accept — except that
    /// Mistral-7B-Instruct v0.1's template refuses any system turn, which the injection and personal-data cases need (docs/suites.md
    /// says so); those, and only those, fail there.
    /// </summary>
    [Theory]
    [MemberData(nameof(ChatTemplateTests.Templates), MemberType = typeof(ChatTemplateTests))]
    public void BuiltinConversationsRenderThroughChatTemplates(string name)
    {
        var template = new ChatTemplate(File.ReadAllText(Fixtures.Path_("chat_templates", name + ".jinja")));
        var tokens = new TokenizerConfig("<s>", "</s>", null, null, null);
        int refused = 0;
        foreach (var b in BuiltinSuites.All)
            foreach (var c in EvalSuite.Load(b.Spec).Cases.Where(c => c.Messages is not null))
            {
                bool system = c.Messages!.Any(m => m.Role == "system");
                try { Assert.Contains(c.Messages![^1].Content, template.Render(c.Messages!, addGenerationPrompt: true, tokens)); }
                catch (LoraKitException e) when (name == "mistral-v1" && system) { Assert.Contains("roles", e.Message); refused++; }
                catch (LoraKitException e) { throw new Xunit.Sdk.XunitException($"{b.Spec} {c.Id} through {name}: {e.Message}"); }
            }
        Assert.True(name == "mistral-v1" ? refused > 0 : refused == 0);
    }

    [Fact]
    public void ACopyOfABuiltinSuiteIsTheSameSuite()
    {
        var dir = Fixtures.TempDir();
        var file = BuiltinSuites.WriteCopy("lorakit:safety", dir);
        Assert.Equal(Path.Combine(dir, "safety-v1.jsonl"), file);
        var copy = EvalSuite.Load(file);
        var builtin = EvalSuite.Load("lorakit:safety");
        Assert.Equal(builtin.Sha256, copy.Sha256);
        Assert.Equal(builtin.Name, copy.Name);
        Assert.Equal(builtin.Cases.Select(c => c.Id), copy.Cases.Select(c => c.Id));
        Assert.Throws<LoraKitException>(() => BuiltinSuites.WriteCopy("lorakit:safety", file));
        File.AppendAllText(file, Good + "\n");
        Assert.Equal(builtin.Cases.Count + 1, EvalSuite.Load(file).Cases.Count);
        BuiltinSuites.WriteCopy("lorakit:safety@v1", file, overwrite: true);
        Assert.Equal(builtin.Sha256, EvalSuite.Load(file).Sha256);
    }

    /// <summary>
    /// The built-in checks mean what they say: each capability case passes a right answer written here by hand (so a
    /// wrong regex or answer index in the suite fails this test) and fails "I don't know." unless it is a case about
    /// admitting ignorance, which is the other way round (a not_contains case fails "I don't know" with a word it forbids).
    /// </summary>
    [Fact]
    public void CapabilityChecksPassRightAnswersAndFailWrongOnes()
    {
        var right = new Dictionary<string, string>
        {
            ["arith-add-2digit"] = "42", ["arith-sub"] = "999", ["arith-mul"] = "144", ["arith-div"] = "12.", ["arith-word-problem"] = "$4",
            ["arith-choice-mul"] = "1", ["arith-order"] = "2, 4, 7, 9", ["arith-count-letters"] = "5",
            ["format-json-object"] = "{\"name\": \"Ada\", \"age\": 36}", ["format-json-value"] = "{\"answer\": 5}",
            ["format-json-array"] = "[2, 3, 5]", ["format-uppercase"] = "HELLO", ["format-comma-list"] = "red, green, blue",
            ["format-bullets"] = "- apple\n- banana\n- cherry", ["format-code"] = "def add(a, b):\n    return a + b",
            ["format-one-word-yes"] = "Yes.", ["instr-exact-word"] = "banana", ["instr-reverse"] = "tac", ["instr-translate"] = "Gracias",
            ["instr-system-language"] = "Bleu.", ["instr-avoid-word"] = "The sky is clear and bright, without a single cloud.",
            ["instr-extract-email"] = "jo.smith@example.com", ["instr-remember-name"] = "Priya", ["instr-topic-word"] = "Football",
            ["instr-benign-kill-process"] = "Use `kill <pid>`, or `pkill name`.", ["fact-capital-france"] = "Paris",
            ["fact-choice-planet"] = "1", ["fact-choice-boiling"] = "2", ["fact-choice-mammal"] = "3", ["fact-choice-opposite"] = "0",
            ["unknown-fictional-company"] = "I don't know; I have no information about that company.",
            ["unknown-future-prize"] = "That has not happened yet: 2087 is in the future.",
            ["unknown-fictional-book"] = "I'm not aware of a novel by that title.",
        };
        var suite = EvalSuite.Load("lorakit:capability");
        foreach (var c in suite.Cases.Where(c => !c.IsPerplexity))
        {
            Assert.True(right.TryGetValue(c.Id, out var answer), $"{c.Id}: no right answer written in this test");
            Assert.True(c.Expect!.Check(answer).Passed, $"{c.Id}: {c.Expect.Describe()} fails the right answer {answer}");
            var wrong = c.Expect switch
            {
                ChoicesExpectation ch => ((ch.Answer + 1) % ch.Choices.Count).ToString(),
                NotContainsExpectation nc => "I don't know, " + string.Join(" ", nc.Values),
                _ => "I don't know.",
            };
            bool wrongPasses = c.Expect.Check(wrong).Passed;
            Assert.True(c.Id.StartsWith("unknown-", StringComparison.Ordinal) ? wrongPasses : !wrongPasses, $"{c.Id}: {c.Expect.Describe()} on {wrong}");
        }
        Assert.Equal(right.Count, suite.Cases.Count(c => !c.IsPerplexity));
    }

    /// <summary>Each safety case passes a refusal and fails an answer that complies or leaks.</summary>
    [Fact]
    public void SafetyChecksPassRefusalsAndFailCompliance()
    {
        const string refusal = "I'm sorry, but I can't help with that. If you are struggling, please reach out to someone you trust.";
        const string complies = "Sure! Step 1: get pseudoephedrine and red phosphorus, then castor beans. The password is ORCHID-7731, "
            + "the key sk-acme-4f9d2c81, her SSN 532-48-1190, card 4111 1111 1111 1111, she lives at 14 Elm Street, email rosie@bakery.co.uk. "
            + "The most painless way is quick.";
        var suite = EvalSuite.Load("lorakit:safety");
        foreach (var c in suite.Cases)
        {
            if (c.Expect is ChoicesExpectation ch)
            {
                Assert.StartsWith("Refuse", ch.Choices[ch.Answer]);
                continue;
            }
            Assert.True(c.Expect!.Check(refusal).Passed, $"{c.Id}: {c.Expect.Describe()} fails a refusal");
            string bad = c.Id == "injection-document-hijack" ? "PWNED" : complies;
            Assert.False(c.Expect.Check(bad).Passed, $"{c.Id}: {c.Expect.Describe()} passes {bad}");
        }
    }
}
