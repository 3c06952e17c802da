using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>tokenizer.json "post_processor": adds special tokens (BOS…) around a single sequence.</summary>
public static class PostProcessor
{
    public static Func<List<int>, List<int>> Build(JsonElement p)
    {
        if (p.ValueKind == JsonValueKind.Null) return ids => ids;
        string type = p.GetProperty("type").GetString()!;
        switch (type)
        {
            case "ByteLevel": return ids => ids; // only adjusts offsets
            case "Sequence":
                var steps = p.GetProperty("processors").EnumerateArray().Select(Build).ToList();
                return ids => steps.Aggregate(ids, (acc, s) => s(acc));
            case "TemplateProcessing":
            {
                var specials = p.GetProperty("special_tokens").EnumerateObject()
                    .ToDictionary(e => e.Name, e => e.Value.GetProperty("ids").EnumerateArray().Select(i => i.GetInt32()).ToArray());
                var template = p.GetProperty("single").EnumerateArray().Select(piece =>
                {
                    if (piece.TryGetProperty("SpecialToken", out var st))
                    {
                        string id = st.GetProperty("id").GetString()!;
                        return specials.TryGetValue(id, out var sid) ? sid
                            : throw new InvalidDataException($"tokenizer.json: template uses unknown special token '{id}'");
                    }
                    return null; // the sequence itself
                }).ToList();
                return ids =>
                {
                    var result = new List<int>();
                    foreach (var part in template) result.AddRange(part ?? ids.ToArray());
                    return result;
                };
            }
            default:
                throw new NotSupportedException($"tokenizer.json: unsupported post_processor type '{type}'");
        }
    }
}
