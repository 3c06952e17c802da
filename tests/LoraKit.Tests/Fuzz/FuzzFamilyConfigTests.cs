using System.Text.Json.Nodes;
using LoraKit.Models;
using static TorchSharp.torch;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// The Phi-3 / Phi-4-mini / Gemma 2 / Gemma 3 config.json fields (Hub and transformers-5 forms, nested RoPE objects and
/// the first entry of every list included) mutated systematically: parsing either succeeds, and then the RoPE tables
/// build and give finite cos/sin, or fails with one clean line naming the file (issue 16's contract, FuzzContract).
/// </summary>
public class FuzzFamilyConfigTests
{
    static readonly (string name, Func<JsonNode?, JsonNode?> make)[] Mutations =
    [
        ("null", _ => null), ("string", _ => "x"), ("true", _ => true), ("array", _ => new JsonArray(1, 2)), ("object", _ => new JsonObject { ["a"] = 1 }),
        ("-1", _ => -1), ("0", _ => 0), ("huge", _ => 1e30), ("int max", _ => int.MaxValue), ("NaN string", _ => "NaN"), ("1.5", _ => 1.5),
        ("same as string", v => v is JsonValue jv ? jv.ToJsonString().Trim('"') : "[]"), ("2^31", _ => 2147483648L), ("empty list", _ => new JsonArray()),
        ("tiny", _ => 1e-300),
    ];

    public static TheoryData<string> Configs => new() { "phi3-mini", "phi4-mini", "phi4-mini v5", "gemma2-2b", "gemma3-1b", "gemma3-4b v5" };

    static JsonObject Original(string name) => name switch
    {
        "phi4-mini v5" => FamilyConfigs.Phi4MiniV5(),
        "gemma3-4b v5" => FamilyConfigs.Gemma3Scaled(hubForm: false),
        _ => FamilyConfigs.Parse(FamilyConfigs.Hub[name]),
    };

    /// <summary>Paths to every value: object members to any depth, and the first entry of each list.</summary>
    static IEnumerable<object[]> Paths(JsonNode? n, object[] prefix)
    {
        switch (n)
        {
            case JsonObject o:
                foreach (var (k, v) in o)
                {
                    object[] p = [.. prefix, k];
                    yield return p;
                    foreach (var q in Paths(v, p)) yield return q;
                }
                break;
            case JsonArray { Count: > 0 } a:
                object[] first = [.. prefix, 0];
                yield return first;
                foreach (var q in Paths(a[0], first)) yield return q;
                break;
        }
    }

    static void Set(JsonObject root, object[] path, Func<JsonNode?, JsonNode?> make)
    {
        JsonNode parent = root;
        foreach (var step in path[..^1]) parent = step is string k ? parent[k]! : parent[(int)step]!;
        if (path[^1] is string key) parent[key] = make(parent[key]?.DeepClone());
        else parent[(int)path[^1]] = make(parent[(int)path[^1]]?.DeepClone());
    }

    static void Remove(JsonObject root, object[] path)
    {
        JsonNode parent = root;
        foreach (var step in path[..^1]) parent = step is string k ? parent[k]! : parent[(int)step]!;
        if (path[^1] is string key) parent.AsObject().Remove(key);
        else parent.AsArray().RemoveAt((int)path[^1]);
    }

    /// <summary>What a load does with the description: parse, then build the RoPE tables and use every layer type's.</summary>
    static void ParseAndRope(JsonObject c)
    {
        var config = ModelConfig.Parse(c, "config.json", describedToo: true);
        if (config.Rope.Values.Any(r => r.RotaryDim > 4096)) return; // a valid but huge head: tables are not the point here
        using var scope = NewDisposeScope();
        using var rope = new RotaryEmbedding(config, CPU);
        var positions = tensor(new long[] { 0, 1, 5000 }).unsqueeze(0);
        foreach (var type in config.LayerTypes.Distinct())
        {
            var (cos, sin) = rope.CosSin(positions, ScalarType.Float32, type);
            // An assertion (not a LoraKit-style error) so that FuzzContract counts it as unclean.
            Assert.True(cos.isfinite().all().item<bool>() && sin.isfinite().all().item<bool>(), $"accepted config gives non-finite RoPE tables for {type}");
        }
    }

    [Theory]
    [MemberData(nameof(Configs))]
    public void EveryFamilyConfigFieldMutatedParsesOrFailsCleanly(string name)
    {
        var original = Original(name);
        FuzzContract.Check("family config.json", $"{name}: unmodified", () => ParseAndRope(original));
        int n = 0, index = 0;
        foreach (var path in Paths(original, []).ToList())
        {
            int offset = index++;
            var cases = Mutations.Where((_, i) => FuzzContract.Scale > 1 || (i + offset) % 3 == 0)
                .Select(m => (m.name, (Action<JsonObject>)(c => Set(c, path, m.make))))
                .Append(("deleted", c => Remove(c, path)));
            foreach (var (mname, apply) in cases)
            {
                var c = (JsonObject)original.DeepClone();
                apply(c);
                var e = FuzzContract.Check("family config.json", $"{name}: {string.Join(".", path)} {mname}", () => ParseAndRope(c));
                if (e != null) Assert.StartsWith("config.json: ", e.Message); // names the file
                n++;
            }
        }
        Assert.True(n > 60, $"only {n} cases");
    }
}
