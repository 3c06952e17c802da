using System.Text.Encodings.Web;
using System.Text.Json;

namespace LoraKit.Cli.Commands;

/// <summary>JSON output for scripts: UTF-8 text as is (no \u escapes for non-ASCII), floats round-trippable.</summary>
public static class CliJson
{
    static readonly JsonSerializerOptions Options = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static string Serialize<T>(T value) => JsonSerializer.Serialize(value, Options);
}
