using LoraKit.Templating;
using LoraKit.Tokenization;

namespace LoraKit.Tests;

/// <summary>Chat templates rendered by LoraKit against jinja2's renderings (fixtures/chat/*.json).</summary>
public class ChatTemplateTests
{
    public static TheoryData<string> Templates => new(["llama3", "qwen2", "qwen3", "mistral", "mistral-v1"]);

    [Theory]
    [MemberData(nameof(Templates))]
    public void RendersLikeJinja2(string name)
    {
        var template = new ChatTemplate(File.ReadAllText(Fixtures.Path_("chat_templates", name + ".jinja")));
        var tokens = new TokenizerConfig("<s>", "</s>", null, null, null);
        int checkedCases = 0;
        foreach (var c in Fixtures.Json("chat", name + ".json").EnumerateArray())
        {
            var extra = c.GetProperty("extra").EnumerateObject().ToDictionary(p => p.Name, p => PyValues.FromJson(p.Value));
            bool agp = c.GetProperty("add_generation_prompt").GetBoolean();
            var expected = c.GetProperty("text");
            if (expected.ValueKind == System.Text.Json.JsonValueKind.Null)
            {
                var ex = Assert.Throws<TemplateException>(() => template.Render(c.GetProperty("messages"), agp, tokens, extra));
                Assert.Contains(c.GetProperty("error").GetString()!, ex.Message);
            }
            else Assert.Equal(expected.GetString(), template.Render(c.GetProperty("messages"), agp, tokens, extra));
            checkedCases++;
        }
        Assert.True(checkedCases >= 16);
    }

    [Fact]
    public void ModelTokenizerConfigCarriesTheTemplate()
    {
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        var t = new ChatTemplate(tok.Config.ChatTemplate!);
        var text = t.Render([new ChatTurn("user", "hi")], true, tok.Config);
        Assert.Equal("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", text);
    }

    [Theory]
    [InlineData("{{ x }}", "")]
    [InlineData("{{ 1 + 2 * 3 }}", "7")]
    [InlineData("{{ 7 // 2 }},{{ -7 // 2 }},{{ 7 % 3 }},{{ 2 ** 3 }},{{ 7 / 2 }}", "3,-4,1,8,3.5")]
    [InlineData("{{ 'a' ~ 1 ~ none }}", "a1None")]
    [InlineData("{{ [1, 2, 3][::-1] }}", "[3, 2, 1]")]
    [InlineData("{{ 'hello'[1:3] }}", "el")]
    [InlineData("{{ {'a': 1, 'b': [true, none]} | tojson }}", "{\"a\": 1, \"b\": [true, null]}")]
    [InlineData("{% for a, b in {'x': 1, 'y': 2}.items() %}{{ a }}={{ b }}{% if not loop.last %},{% endif %}{% endfor %}", "x=1,y=2")]
    [InlineData("{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}", "6")]
    [InlineData("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{% endfor %}{{ x }}", "1")]
    [InlineData("{% for i in [1, 2, 3] if i != 2 %}{{ i }}{% else %}none{% endfor %}", "13")]
    [InlineData("{% for i in [] %}{{ i }}{% else %}empty{% endfor %}", "empty")]
    [InlineData("{{ 'a,b,,c'.split(',') | length }} {{ '  x  '.strip() }}|{{ 'xxhixx'.strip('x') }}", "4 x|hi")]
    [InlineData("{{ x is defined }} {{ none is none }} {{ 'a' is string }} {{ 3 is divisibleby 3 }}", "False True True True")]
    [InlineData("{% macro greet(name, p='!') %}hi {{ name }}{{ p }}{% endmacro %}{{ greet('bob') }}", "hi bob!")]
    [InlineData("{{ ['a', 'b', 'c'] | reject('equalto', 'b') | join(', ') }}", "a, c")]
    [InlineData("{{ 'yes' if 1 > 2 else 'no' }}", "no")]
    [InlineData("  {%- if true %}\n  x\n  {%- endif %}", "  x")]
    [InlineData("a\n  {% if true %}\n  b\n  {% endif %}\nc", "a\n  b\nc")]
    [InlineData("{{ 1 == 1.0 }} {{ 'ab' in 'cabd' }} {{ 2 not in [1, 3] }}", "True True True")]
    public void ExpressionAndWhitespaceSemantics(string template, string expected)
    {
        var t = new ChatTemplate(template);
        Assert.Equal(expected, t.Render([], false, new TokenizerConfig(null, null, null, null, null)));
    }

    [Theory]
    [InlineData("{% if x %}", "missing")]
    [InlineData("{{ 'abc }}", "unterminated")]
    [InlineData("{{ x | nosuchfilter }}", "unknown filter 'nosuchfilter'")]
    [InlineData("{{ raise_exception('bad roles') }}", "bad roles")]
    [InlineData("{% frobnicate %}", "unsupported statement 'frobnicate'")]
    public void ErrorsAreClear(string template, string fragment)
    {
        var ex = Assert.ThrowsAny<TemplateException>(() =>
            new ChatTemplate(template).Render([], false, new TokenizerConfig(null, null, null, null, null)));
        Assert.Contains(fragment, ex.Message);
    }
}
