using System.Text.Json.Nodes;
using LoraKit.Models;

namespace LoraKit.Tests;

/// <summary>
/// The Phi-3 / Phi-4-mini / Gemma 2 / Gemma 3 fixtures that scripts/fixtures/make_family_fixtures.py writes (on the GPU
/// machine, with transformers + PEFT) into fixtures/{models,reference,adapters,training}.
/// </summary>
public static class FamilyFixtures
{
    /// <summary>
    /// The skip reason of the tests that read those fixtures; set it to null once they are committed (one line to change).
    /// </summary>
    public const string? Pending = null;

    public static readonly string[] Architectures = ["phi3", "phi4mini", "gemma2", "gemma3"];

    /// <summary>The family fixtures whose modules exist: the model-level tests (logits, generation, PEFT, training) run on them.</summary>
    public static readonly string[] Built = ["phi3", "phi4mini", "gemma2", "gemma3"];

    /// <summary>A fixture model's config.json, parsed as a description (its modules may not exist yet).</summary>
    public static ModelConfig Config(string arch) =>
        ModelConfig.Parse((JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Model(arch), "config.json")))!,
            "config.json", describedToo: true);
}
