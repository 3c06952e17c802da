using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Evaluation;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// Suite files are untrusted input (issue 18): every field of every kind of case × wrong types and values, random byte
/// damage (invalid UTF-8 included), deep nesting, huge numbers and hostile regexes. Each load either succeeds or throws a
/// <see cref="SuiteException"/> — never any other type — whose one line starts with the file name and line, within the
/// fuzz contract's time bound; a hostile regex that loads is then checked on long outputs, also in bounded time.
/// </summary>
public class FuzzSuitesTests
{
    const string Source = "fuzz.jsonl";
    const string First = """{"id": "first", "kind": "task", "prompt": "p", "expect": {"equals": "x"}}""";

    /// <summary>One valid case of every input and expectation, the seeds of the mutations.</summary>
    static readonly string[] Seeds =
    [
        """{"id": "a", "kind": "task", "prompt": "2+2=", "expect": {"equals": "4"}, "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "seed": 3}""",
        """{"id": "b", "kind": "capability", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "expect": {"contains": ["x", "y"]}}""",
        """{"id": "c", "kind": "safety", "messages": [{"role": "user", "content": "u"}], "expect": {"not_contains": ["secret"]}}""",
        """{"id": "d", "kind": "task", "prompt": "p", "expect": {"regex": "(?i)^yes\\b"}}""",
        """{"id": "e", "kind": "capability", "messages": [{"role": "user", "content": "u"}], "expect": {"choices": ["a", "b", "c"], "answer": 2}}""",
        """{"id": "f", "kind": "task", "prompt": "p", "expect": {"label": "billing"}}""",
        """{"id": "g", "kind": "task", "prompt": "p", "expect": {"json": true}}""",
        """{"id": "h", "kind": "task", "prompt": "p", "expect": {"rubric": "polite"}}""",
        """{"id": "i", "kind": "capability", "text": "Some prose."}""",
    ];

    static readonly (string name, Func<JsonNode?, JsonNode?> make)[] ValueMutations =
    [
        ("null", _ => null), ("string", _ => "x"), ("empty string", _ => ""), ("true", _ => true), ("false", _ => false),
        ("array", _ => new JsonArray(1, 2)), ("empty array", _ => new JsonArray()), ("object", _ => new JsonObject { ["a"] = 1 }),
        ("-1", _ => -1), ("0", _ => 0), ("1.5", _ => 1.5), ("huge", _ => 1e300), ("int max", _ => int.MaxValue), ("2^63", _ => JsonNode.Parse("9223372036854775808")),
        ("1e400", _ => JsonNode.Parse("1e400")), ("-0", _ => JsonNode.Parse("-0")), ("tiny", _ => JsonNode.Parse("1e-400")),
        ("same as string", v => v is JsonValue jv ? jv.ToJsonString().Trim('"') : "[]"), ("wrapped in array", v => new JsonArray(v?.DeepClone())),
        ("deep", _ => JsonNode.Parse(new string('[', 14) + new string(']', 14))), ("long string", _ => new string('z', 100_000)),
        ("control chars", _ => "a\u0000\u0007b"), ("surrogate pair", _ => "😀"),
    ];

    /// <summary>The contract for one suite text: loads, or a SuiteException naming the source and a line.</summary>
    static void Load(string caseName, byte[] bytes)
    {
        var e = FuzzContract.Check("suite", caseName, () => SuiteReader.Parse(bytes, Source, Source));
        if (e is null) return;
        Assert.True(e is SuiteException, $"[suite] {caseName}: {e.GetType().Name} instead of SuiteException: {e.Message}");
        Assert.StartsWith(Source + ":", e.Message);
    }

    static byte[] Suite(string line) => Encoding.UTF8.GetBytes(First + "\n\n" + line + "\n");

    /// <summary>Paths to every value in a JSON tree (object keys and array indexes).</summary>
    static IEnumerable<List<object>> Paths(JsonNode? n, List<object> prefix)
    {
        switch (n)
        {
            case JsonObject o:
                foreach (var (k, v) in o.ToList())
                {
                    var p = new List<object>(prefix) { k };
                    yield return p;
                    foreach (var sub in Paths(v, p)) yield return sub;
                }
                break;
            case JsonArray a:
                for (int i = 0; i < a.Count; i++)
                {
                    var p = new List<object>(prefix) { i };
                    yield return p;
                    foreach (var sub in Paths(a[i], p)) yield return sub;
                }
                break;
        }
    }

    static JsonNode? Get(JsonNode root, List<object> path)
    {
        JsonNode? n = root;
        foreach (var k in path) n = k is string s ? n![s] : n![(int)k];
        return n;
    }

    static void Set(JsonNode root, List<object> path, JsonNode? value, bool delete)
    {
        var parent = path.Count == 1 ? root : Get(root, path[..^1])!;
        switch (parent, path[^1])
        {
            case (JsonObject o, string key): if (delete) o.Remove(key); else o[key] = value; break;
            case (JsonArray a, int i): if (delete) a.RemoveAt(i); else a[i] = value; break;
        }
    }

    [Fact]
    public void EveryFieldOfEveryCaseMutatedLoadsOrFailsCleanly()
    {
        int n = 0;
        foreach (var seed in Seeds)
        {
            var original = JsonNode.Parse(seed)!;
            Load($"seed {original["id"]}", Suite(seed));
            foreach (var p in Paths(original, []).ToList())
            {
                // Every mutation under --fuzz; by default a rotating third of them plus deletion.
                var muts = ValueMutations.Where((_, i) => FuzzContract.Scale > 1 || (i + n) % 3 == 0);
                foreach (var (mname, make) in muts.Append(("deleted", _ => null)))
                {
                    var t = original.DeepClone();
                    Set(t, p, make(Get(original, p)?.DeepClone()), mname == "deleted");
                    Load($"{original["id"]}: {string.Join(".", p)} {mname}", Suite(t.ToJsonString()));
                    n++;
                }
            }
            foreach (var extra in new[] { "extra", "Expect", "ID", "max_token", "stop", "" })
            {
                var t = original.DeepClone();
                t[extra] = 1;
                Load($"{original["id"]}: added field '{extra}'", Suite(t.ToJsonString()));
            }
        }
        Assert.True(n > 200, $"only {n} cases");
    }

    [Fact]
    public void RandomByteDamageLoadsOrFailsCleanly()
    {
        var r = FuzzContract.Rng("suite/bytes");
        int rounds = 300 * FuzzContract.Scale;
        for (int i = 0; i < rounds; i++)
        {
            var bytes = Encoding.UTF8.GetBytes(string.Join("\n", Seeds) + "\n").ToList();
            int edits = 1 + r.Next(6);
            var what = new List<string>();
            for (int k = 0; k < edits && bytes.Count > 0; k++)
            {
                int at = r.Next(bytes.Count);
                switch (r.Next(5))
                {
                    case 0: bytes[at] = (byte)r.Next(256); what.Add($"set {at}"); break;
                    case 1: bytes.RemoveAt(at); what.Add($"del {at}"); break;
                    case 2: bytes.Insert(at, (byte)r.Next(256)); what.Add($"ins {at}"); break;
                    case 3: bytes.InsertRange(at, Encoding.UTF8.GetBytes(new[] { "{", "}", "[", "]", "\"", ",", ":", "\\", "\\u", "\n", "\r" }[r.Next(11)])); what.Add($"tok {at}"); break;
                    default: bytes.InsertRange(at, new byte[] { 0xC3, 0x28, 0xFF, 0xED, 0xA0, 0x80 }.Skip(r.Next(5)).Take(1 + r.Next(2))); what.Add($"bad utf8 {at}"); break;
                }
            }
            Load($"bytes #{i}: {string.Join(", ", what)}", bytes.ToArray());
        }
        var whole = Encoding.UTF8.GetBytes(string.Join("\n", Seeds));
        foreach (int cut in Enumerable.Range(0, whole.Length).Where(c => c % Math.Max(1, 17 / FuzzContract.Scale) == 0))
            Load($"truncated at {cut}", whole[..cut]);
    }

    [Fact]
    public void HostileShapesLoadOrFailCleanly()
    {
        var cases = new (string name, string line)[]
        {
            ("deep arrays", new string('[', 100_000) + new string(']', 100_000)),
            ("deep objects", string.Concat(Enumerable.Repeat("{\"a\":", 5000)) + "1" + new string('}', 5000)),
            ("deep in messages", """{"id": "x", "kind": "task", "messages": """ + new string('[', 3000) + new string(']', 3000) + """, "expect": {"json": true}}"""),
            ("lone surrogate id", """{"id": "\udc00", "kind": "task", "prompt": "p", "expect": {"json": true}}"""),
            ("lone surrogate regex", """{"id": "x", "kind": "task", "prompt": "p", "expect": {"regex": "\ud800+"}}"""),
            ("lone surrogate content", """{"id": "x", "kind": "task", "messages": [{"role": "user", "content": "\ud83d"}], "expect": {"json": true}}"""),
            ("NUL escapes", """{"id": "x\u0000", "kind": "task", "prompt": "\u0000", "expect": {"equals": "\u0000"}}"""),
            ("duplicate in expect", """{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true, "json": true}}"""),
            ("duplicate in message", """{"id": "x", "kind": "task", "messages": [{"role": "user", "role": "system", "content": "c"}], "expect": {"json": true}}"""),
            ("huge exponent", """{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "max_tokens": 1e99999999}"""),
            ("many digits", """{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "seed": """ + new string('9', 10_000) + "}"),
            ("NaN literal", """{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true}, "temperature": NaN}"""),
            ("10k choices", """{"id": "x", "kind": "task", "prompt": "p", "expect": {"choices": [""" + string.Join(",", Enumerable.Range(0, 10_000).Select(i => $"\"{i}\"")) + """], "answer": 0}}"""),
            ("10k messages", """{"id": "x", "kind": "task", "messages": [""" + string.Join(",", Enumerable.Repeat("""{"role": "user", "content": "c"}""", 10_000)) + """], "expect": {"json": true}}"""),
            ("comment", "// a comment"),
            ("trailing comma", """{"id": "x", "kind": "task", "prompt": "p", "expect": {"json": true},}"""),
            ("two objects on a line", First.Replace("first", "x") + " " + First.Replace("first", "y")),
            ("bare string", "\"x\""),
            ("null", "null"),
            ("very long id", """{"id": """ + JsonSerializer.Serialize(new string('i', 500_000)) + """, "kind": "task", "prompt": "p", "expect": {"json": true}}"""),
        };
        foreach (var (name, line) in cases) Load(name, Suite(line));
        Load("only a BOM", Encoding.UTF8.Preamble.ToArray());
        Load("NUL bytes", new byte[1000]);
        Load("CR only", Encoding.UTF8.GetBytes(First + "\r" + First.Replace("first", "second") + "\r"));
    }

    [Fact]
    public void HostileRegexesFailToLoadOrCheckInBoundedTime()
    {
        string[] patterns =
        [
            "(a+)+$", "(a|aa)+$", "(a|a?)+$", "^(\\w+\\s?)*$", "(.*a){20}", "(x+x+)+y", "((a*)*)*b", "^(([a-z])+.)+[A-Z]([a-z])+$",
            "(?<=(a+)+)b", "(?=(a+)+$)", "(\\1)", "a{2147483647}", "a{1000000}{1000000}", "(?<x>a)\\k<y>", "[", "(", "\\", "(?", "*a",
            "a**", "(?i", "[z-a]", "\\p{Nope}", "(?<=a*)", new string('(', 5000) + new string(')', 5000), "x{99999999999}",
        ];
        var outputs = new[] { new string('a', 30_000) + "!", string.Concat(Enumerable.Repeat("ab ", 10_000)) + "$", new string('x', 50_000) };
        foreach (var pattern in patterns)
        {
            var line = $$$"""{"id": "x", "kind": "task", "prompt": "p", "expect": {"regex": {{{JsonSerializer.Serialize(pattern)}}}}}""";
            EvalSuite? suite = null;
            var e = FuzzContract.Check("suite", $"regex {pattern[..Math.Min(pattern.Length, 40)]}", () => suite = SuiteReader.Parse(Suite(line), Source, Source));
            if (e is not null)
            {
                Assert.IsType<SuiteException>(e);
                Assert.StartsWith($"{Source}:3: field 'expect.regex': ", e.Message);
                continue;
            }
            var expect = suite!.Cases[1].Expect!;
            foreach (var output in outputs)
            {
                var sw = Stopwatch.StartNew();
                FuzzContract.Check("suite", $"regex {pattern[..Math.Min(pattern.Length, 40)]} on {output.Length} chars", () => expect.Check(output),
                    RegexExpectation.MatchTimeout * 5);
                Assert.True(sw.Elapsed < RegexExpectation.MatchTimeout * 5, $"/{pattern}/ took {sw.Elapsed}");
            }
        }
    }
}
