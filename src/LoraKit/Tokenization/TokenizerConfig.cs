using System.Text.Json;
using LoraKit.IO;

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
            using var doc = JsonFiles.Parse(path);
            var r = doc.RootElement;
            if (r.ValueKind != JsonValueKind.Object) throw new LoraKitException($"{path}: must hold a JSON object, got {JsonFiles.KindOf(r)}");
            bos = TokenString(r, "bos_token", path); eos = TokenString(r, "eos_token", path);
            pad = TokenString(r, "pad_token", path); unk = TokenString(r, "unk_token", path);
            if (r.TryGetProperty("chat_template", out var ct))
            {
                // Either one template, or a list of {name, template} where "default" is the one to use.
                template = ct.ValueKind switch
                {
                    JsonValueKind.String => ct.GetString(),
                    JsonValueKind.Null => null,
                    JsonValueKind.Array => ct.EnumerateArray().Select(x => NamedTemplate(x, path)).Where(x => x.name == "default")
                        .Select(x => x.template).FirstOrDefault(),
                    _ => throw new LoraKitException($"{path}: 'chat_template' must be a string or a list of {{name, template}}, got {JsonFiles.KindOf(ct)}"),
                };
            }
        }
        var jinja = Path.Combine(dir, "chat_template.jinja");
        if (File.Exists(jinja)) template = JsonFiles.ReadText(jinja); // transformers prefers the separate file
        return new TokenizerConfig(bos, eos, pad, unk, template);
    }

    static (string? name, string? template) NamedTemplate(JsonElement x, string path) =>
        x.ValueKind == JsonValueKind.Object
        && x.TryGetProperty("name", out var n) && n.ValueKind == JsonValueKind.String
        && x.TryGetProperty("template", out var t) && t.ValueKind == JsonValueKind.String
            ? (n.GetString(), t.GetString())
            : throw new LoraKitException($"{path}: each 'chat_template' entry must be an object with string 'name' and 'template'");

    static string? TokenString(JsonElement r, string name, string path)
    {
        if (!r.TryGetProperty(name, out var v)) return null;
        return v.ValueKind switch
        {
            JsonValueKind.Null => null,
            JsonValueKind.String => v.GetString(),
            JsonValueKind.Object when v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => c.GetString(),
            _ => throw new LoraKitException($"{path}: '{name}' must be a string or an object with a string 'content', got {JsonFiles.KindOf(v)}"),
        };
    }
}
