using System.Text;
using System.Text.Json;
using LoraKit.Templating;
using LoraKit.Tokenization;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// Chat templates ship inside model files, so they are untrusted input: every template, however broken or hostile,
/// must render or fail with a <see cref="TemplateException"/> in bounded time and memory (issue 16, item 4).
/// </summary>
public class FuzzTemplatesTests
{
    const string Area = "template";

    static readonly TokenizerConfig Tokens = new("<s>", "</s>", "<pad>", "<unk>", null);

    static readonly JsonElement Messages = JsonDocument.Parse("""
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
         {"role": "tool", "content": "{\"result\": 4}"},
         {"role": "user", "content": ["a", "list", "content"]}]
        """).RootElement.Clone();

    static string Render(string template) => new ChatTemplate(template).Render(Messages, true, Tokens);

    /// <summary>Renders under the contract and insists on a TemplateException whose message contains <paramref name="fragment"/>.</summary>
    static void AssertRefused(string name, string template, string fragment)
    {
        var e = FuzzContract.Check(Area, name, () => Render(template));
        var te = Assert.IsType<TemplateException>(e);
        Assert.Contains(fragment, te.Message);
    }

    // ---- item 4: each of these crashed the process, grew to gigabytes or ran for minutes before the limits ----

    [Fact] public void RecursiveMacroIsAnErrorNotAStackOverflow() =>
        AssertRefused("recursive macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "deeper than");

    [Fact] public void MutuallyRecursiveMacrosAreAnError() =>
        AssertRefused("mutual recursion", "{% macro a() %}{{ b() }}{% endmacro %}{% macro b() %}{{ a() }}{% endmacro %}{{ a() }}", "deeper than");

    [Fact] public void HugeRangeIsRefusedBeforeItIsBuilt() =>
        AssertRefused("range(1e9)", "{% for i in range(1000000000) %}x{% endfor %}", "range()");

    [Fact] public void HugeStringRepetitionIsRefused() =>
        AssertRefused("'x' * 1e9", "{{ 'x' * 1000000000 }}", "limit");

    [Fact] public void HugeListRepetitionIsRefused() =>
        AssertRefused("[1] * 1e9", "{{ ([1] * 1000000000) | length }}", "limit");

    [Fact] public void DoublingAStringInALoopIsRefused() =>
        AssertRefused("doubling", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}", "limit");

    [Fact] public void NestedLoopsRunOutOfWorkNotTime() =>
        AssertRefused("1e9 iterations", "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}{% endfor %}{% endfor %}{% endfor %}", "work limit");

    [Fact] public void JoiningOneLongStringAMillionTimesIsRefused() =>
        AssertRefused("join amplification", "{{ (['x' * 1000000] * 1000000) | join('') }}", "limit");

    [Fact] public void ANamespaceThatContainsItselfIsAnError() =>
        AssertRefused("self-containing namespace", "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}", "nests deeper");

    [Fact] public void DeeplyNestedParenthesesAreAParseError() =>
        AssertRefused("100k parentheses", "{{ " + new string('(', 100_000) + "1" + new string(')', 100_000) + " }}", "nests deeper");

    [Fact] public void DeeplyNestedBlocksAreAParseError() =>
        AssertRefused("10k nested ifs", string.Concat(Enumerable.Repeat("{% if true %}", 10_000)) + string.Concat(Enumerable.Repeat("{% endif %}", 10_000)), "nests deeper");

    [Fact] public void DivisibleByZeroIsATemplateError() => AssertRefused("divisibleby(0)", "{{ 4 is divisibleby(0) }}", "test 'divisibleby'");

    [Fact] public void RaisedMessagesStayOnOneLine() => AssertRefused("raise multi-line", "{{ raise_exception('first\nsecond') }}", "first second");

    [Fact] public void BreakOutsideALoopIsAnError() => AssertRefused("break outside loop", "a{% break %}b", "outside a for loop");

    [Fact]
    public void RealisticTemplatesStayFarBelowTheLimits()
    {
        // A long conversation through the real templates: the limits must never bite on ordinary use.
        var msgs = Enumerable.Range(0, 400).Select(i => new ChatTurn(i % 2 == 0 ? "user" : "assistant", new string('w', 2000) + i)).ToList();
        foreach (var name in new[] { "llama3", "qwen2", "qwen3", "mistral" })
        {
            var t = new ChatTemplate(File.ReadAllText(Fixtures.Path_("chat_templates", name + ".jinja")));
            var text = t.Render(msgs, true, Tokens);
            Assert.True(text.Length > 800_000, name);
            Assert.True(RenderLimits.WorkUsed < RenderLimits.MaxWork / 10, $"{name} used {RenderLimits.WorkUsed} of {RenderLimits.MaxWork}");
        }
    }

    // ---- generated and mutated templates ----

    static readonly string[] Filters =
    [
        "trim", "length", "count", "join", "tojson", "upper", "lower", "title", "capitalize", "string", "int", "float", "abs",
        "default", "first", "last", "list", "reverse", "unique", "sum", "replace", "safe", "e", "items", "dictsort", "select",
        "reject", "selectattr", "rejectattr", "map", "sort", "indent", "round", "nosuchfilter",
    ];

    static readonly string[] Tests = ["defined", "undefined", "none", "string", "number", "mapping", "iterable", "sequence", "divisibleby", "equalto", "odd", "in", "nosuchtest"];

    static readonly string[] Methods = ["strip", "split", "startswith", "endswith", "upper", "replace", "find", "count", "join", "items", "keys", "get", "index", "splitlines", "title", "nosuch"];

    static string Expr(Random r, int depth)
    {
        if (depth > 3) return Atom(r);
        return r.Next(12) switch
        {
            0 => $"{Expr(r, depth + 1)} {Pick(r, "+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", ">", "and", "or", "in", "not in")} {Expr(r, depth + 1)}",
            1 => $"{Expr(r, depth + 1)} | {Pick(r, Filters)}" + (r.Next(2) == 0 ? $"({Args(r, depth)})" : ""),
            2 => $"{Expr(r, depth + 1)} is {(r.Next(3) == 0 ? "not " : "")}{Pick(r, Tests)}" + (r.Next(3) == 0 ? $"({Atom(r)})" : ""),
            3 => $"{Expr(r, depth + 1)}.{Pick(r, Methods)}({Args(r, depth)})",
            4 => $"{Expr(r, depth + 1)}[{Expr(r, depth + 1)}]",
            5 => $"{Expr(r, depth + 1)}[{Atom(r)}:{Atom(r)}:{Pick(r, "", "1", "-1", "0", "2")}]",
            6 => $"({Expr(r, depth + 1)} if {Expr(r, depth + 1)} else {Expr(r, depth + 1)})",
            7 => $"[{Args(r, depth)}]",
            8 => $"{{{Atom(r)}: {Expr(r, depth + 1)}, {Atom(r)}: {Atom(r)}}}",
            9 => $"{Pick(r, "range", "namespace", "dict", "raise_exception", "strftime_now", "nosuchfn")}({Args(r, depth)})",
            10 => $"not {Expr(r, depth + 1)}",
            _ => Atom(r),
        };
    }

    static string Args(Random r, int depth) => string.Join(", ", Enumerable.Range(0, r.Next(4)).Select(_ =>
        r.Next(4) == 0 ? $"{Pick(r, "attribute", "default", "indent", "reverse", "x", "d")}={Expr(r, depth + 2)}" : Expr(r, depth + 2)));

    static string Atom(Random r) => r.Next(16) switch
    {
        0 => "messages", 1 => "message", 2 => "message.content", 3 => "message['role']", 4 => "loop.index",
        5 => "none", 6 => "true", 7 => "'text'", 8 => "\"a'b\"", 9 => "0", 10 => "-1", 11 => "3.5",
        12 => Pick(r, "1000000", "99999999999999999999999", "9223372036854775807", "-9223372036854775807 - 1"),
        13 => "bos_token", 14 => "ns.x", _ => "undefined_name",
    };

    static string Statement(Random r, int depth)
    {
        if (depth > 3) return Output(r);
        return r.Next(11) switch
        {
            0 => $"{{% if {Expr(r, 1)} %}}{Body(r, depth + 1)}{{% elif {Expr(r, 1)} %}}{Body(r, depth + 1)}{{% else %}}{Body(r, depth + 1)}{{% endif %}}",
            1 => $"{{% for message in {Pick(r, "messages", "range(5)", "message", "'abc'", "{'a': 1}", "none", Expr(r, 2))} %}}{Body(r, depth + 1)}{{% endfor %}}",
            2 => $"{{% set x = {Expr(r, 1)} %}}",
            3 => $"{{% set ns = namespace(x={Atom(r)}) %}}{{% set ns.x = {Expr(r, 1)} %}}",
            4 => $"{{% macro m(a, b=1) %}}{Body(r, depth + 1)}{{% endmacro %}}{{{{ m({Args(r, 1)}) }}}}",
            5 => $"{{% set blk %}}{Body(r, depth + 1)}{{% endset %}}{{{{ blk }}}}",
            6 => $"{{% for a, b in {Pick(r, "messages[0].items()", "[[1, 2], [3]]", "{'k': 'v'}.items()")} %}}{{{{ a }}}}{Pick(r, "{% break %}", "{% continue %}", "")}{{% endfor %}}",
            7 => "{# comment #}" + Pick(r, "\n", "  ", "{%- if true -%} x {%+ endif %}"),
            8 => $"{{% macro c(x) %}}[{{{{ caller() }}}}]{{% endmacro %}}{{% call c({Atom(r)}) %}}{Body(r, depth + 1)}{{% endcall %}}",
            _ => Output(r),
        };
    }

    static string Output(Random r) => $"{{{{ {Expr(r, 0)} }}}}";

    static string Body(Random r, int depth) => string.Concat(Enumerable.Range(0, r.Next(1, 4)).Select(_ => r.Next(3) == 0 ? "text\n" : Statement(r, depth)));

    static string Pick(Random r, params string[] xs) => xs[r.Next(xs.Length)];

    [Fact]
    public void GeneratedTemplatesRenderOrFailCleanly()
    {
        var r = FuzzContract.Rng("templates/generated");
        int n = 600 * FuzzContract.Scale;
        for (int i = 0; i < n; i++)
        {
            var t = Body(r, 0);
            FuzzContract.Check(Area, $"generated #{i}: {t}", () => Render(t));
        }
    }

    static readonly string[] Splices =
    [
        "{{", "}}", "{%", "%}", "{#", "#}", "{% endfor %}", "{% endif %}", "{% for x in messages %}", "{% if %}", "(", ")", "[", "]",
        "|", "|nosuch", " is ", ".", "'", "\"", "\\", "-", "~", "**", "{% macro r() %}{{ r() }}{% endmacro %}{{ r() }}",
        "{{ 'y' * 100000000 }}", "{% for i in range(100000000) %}{% endfor %}", "{{ range(-5, 5, 0) }}", "\0", "\u00e9", "\ud83d\ude00",
        "{% set ns.z = 1 %}", "{{ messages[99999999999999999999] }}", "{{ 1 // 0 }}", "{{ 1 % 0 }}", "{{ -9223372036854775807 - 1 % -1 }}",
        "{{ [1,2] | sort(attribute='x') }}", "{{ messages | sort }}", "{{ 'a'.split('') }}", "{{ 'abc' | indent(99999999999) }}",
        "{{ 2.5 | round(99) }}", "{% for a in messages %}{% for b in messages %}{{ messages | tojson(indent=99) }}{% endfor %}{% endfor %}",
        "{{ loop.cycle() }}", "{% set x = namespace(a=1) %}{{ x.a.b.c }}", "{{ ('a' ~ 'b') * -5 }}", "{{ [1] * 3 * 3 * 1000000 }}", "{{ x.y.z }}", "{{ none.x }}", "{{ messages | map('nosuch') | list }}",
    ];

    [Fact]
    public void MutatedRealTemplatesRenderOrFailCleanly()
    {
        var r = FuzzContract.Rng("templates/mutated");
        var sources = Directory.GetFiles(Fixtures.Path_("chat_templates"), "*.jinja").Order().Select(File.ReadAllText).ToArray();
        int n = 250 * FuzzContract.Scale;
        for (int i = 0; i < n; i++)
        {
            var src = sources[i % sources.Length];
            var sb = new StringBuilder(src);
            int edits = r.Next(1, 4);
            var log = new List<string>();
            for (int k = 0; k < edits && sb.Length > 0; k++)
            {
                int at = r.Next(sb.Length);
                switch (r.Next(4))
                {
                    case 0:
                        int len = Math.Min(r.Next(1, 40), sb.Length - at);
                        sb.Remove(at, len); log.Add($"del {at}+{len}"); break;
                    case 1:
                        var s = Pick(r, Splices);
                        sb.Insert(at, s); log.Add($"ins {at} {s}"); break;
                    case 2:
                        int from = r.Next(sb.Length), l2 = Math.Min(r.Next(1, 200), sb.Length - from);
                        sb.Insert(at, sb.ToString(from, l2)); log.Add($"dup {from}+{l2}@{at}"); break;
                    default:
                        sb.Length = at; log.Add($"truncate {at}"); break;
                }
            }
            var t = sb.ToString();
            FuzzContract.Check(Area, $"mutated #{i} ({string.Join("; ", log)})", () => Render(t));
        }
    }
}
