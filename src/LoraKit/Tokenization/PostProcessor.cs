using System.Text.Json;

namespace LoraKit.Tokenization;

/// <summary>tokenizer.json "post_processor": adds special tokens (BOS…) around a single sequence.</summary>
internal static class PostProcessor
{
    /// <summary>The ids a (validated) post_processor adds, with their names, to check against the vocabulary.</summary>
    public static IEnumerable<(string name, int id)> SpecialIds(JsonElement p)
    {
        if (p.ValueKind != JsonValueKind.Object) yield break;
        if (p.TryGetProperty("processors", out var procs) && procs.ValueKind == JsonValueKind.Array)
            foreach (var sub in procs.EnumerateArray())
                foreach (var x in SpecialIds(sub)) yield return x;
        if (p.TryGetProperty("special_tokens", out var st) && st.ValueKind == JsonValueKind.Object)
            foreach (var e in st.EnumerateObject())
                if (e.Value.ValueKind == JsonValueKind.Object && e.Value.TryGetProperty("ids", out var ids) && ids.ValueKind == JsonValueKind.Array)
                    foreach (var i in ids.EnumerateArray())
                        if (i.TryGetInt32(out int id)) yield return (e.Name, id);
    }

    public static Func<List<int>, List<int>> Build(JsonElement p)
    {
        if (p.ValueKind is JsonValueKind.Null or JsonValueKind.Undefined) return ids => ids;
        string type = p.Str("type", "post_processor");
        switch (type)
        {
            case "ByteLevel": return ids => ids; // only adjusts offsets
            case "Sequence":
                var steps = p.Arr("processors", "post_processor").Select(Build).ToList();
                return ids => steps.Aggregate(ids, (acc, s) => s(acc));
            case "TemplateProcessing":
            {
                var specials = new Dictionary<string, int[]>(StringComparer.Ordinal);
                foreach (var e in p.Obj("special_tokens", "post_processor"))
                    specials[e.Name] = e.Value.Arr("ids", $"post_processor.special_tokens.{e.Name}").Select(i => i.AsInt($"post_processor.special_tokens.{e.Name}.ids")).ToArray();
                var template = p.Arr("single", "post_processor").Select(piece =>
                {
                    if (piece.ValueKind == JsonValueKind.Object && piece.TryGetProperty("SpecialToken", out var st))
                    {
                        string id = st.Str("id", "post_processor.single.SpecialToken");
                        return specials.TryGetValue(id, out var sid) ? sid
                            : throw new InvalidDataException($"template uses unknown special token '{id}'");
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
                throw new NotSupportedException($"unsupported post_processor type '{type}'");
        }
    }
}
