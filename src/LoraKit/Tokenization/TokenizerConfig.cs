using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>The parts of <c>tokenizer_config.json</c> (and <c>chat_template.jinja</c>) LoraKit uses.</summary>
public sealed record TokenizerConfig(string? BosToken, string? EosToken, string? PadToken, string? UnkToken, string? ChatTemplate)
{
    public static TokenizerConfig Load(string dir)
    {
        string? bos = null, eos = null, pad = null, unk = null, template = null;
        var path = Path.Combine(dir, "tokenizer_config.json");
        if (File.Exists(path))
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var r = doc.RootElement;
            bos = TokenString(r, "bos_token"); eos = TokenString(r, "eos_token");
            pad = TokenString(r, "pad_token"); unk = TokenString(r, "unk_token");
            if (r.TryGetProperty("chat_template", out var ct))
            {
                // Either one template, or a list of {name, template} where "default" is the one to use.
                template = ct.ValueKind == JsonValueKind.String ? ct.GetString()
                    : ct.ValueKind == JsonValueKind.Array
                        ? ct.EnumerateArray().Where(x => x.GetProperty("name").GetString() == "default")
                            .Select(x => x.GetProperty("template").GetString()).FirstOrDefault()
                        : null;
            }
        }
        var jinja = Path.Combine(dir, "chat_template.jinja");
        if (File.Exists(jinja)) template = File.ReadAllText(jinja); // transformers prefers the separate file
        return new TokenizerConfig(bos, eos, pad, unk, template);
    }

    static string? TokenString(JsonElement r, string name) =>
        !r.TryGetProperty(name, out var v) ? null
        : v.ValueKind == JsonValueKind.String ? v.GetString()
        : v.ValueKind == JsonValueKind.Object && v.TryGetProperty("content", out var c) ? c.GetString()
        : null;
}
