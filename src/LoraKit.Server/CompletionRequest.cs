using System.Text.Json;
using System.Text.Json.Nodes;
using LoraKit.Generation;

namespace LoraKit.Server;

/// <summary>A request error for the client: its HTTP status, one line, and the field it is about (OpenAI's "param").</summary>
public sealed class ApiError(int status, string message, string? param = null) : Exception(message)
{
    public int Status { get; } = status;
    public string? Param { get; } = param;
}

/// <summary>
/// Strictly typed reads of request fields: a field that is absent or null reads as null; any other type than the one
/// asked for is a 400 that names the field and says what it must be (so a wrongly typed body is never a 500).
/// </summary>
public static class Json
{
    public static string Kind(JsonNode? v) => v?.GetValueKind() switch
    {
        null or JsonValueKind.Null => "null",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Array => "an array",
        JsonValueKind.Object => "an object",
        _ => "an unknown value",
    };

    static JsonNode? Field(JsonObject o, string key) => o.TryGetPropertyValue(key, out var v) ? v : null;

    /// <summary>A JSON string's text; a lone surrogate ("\ud800") is refused, since no tokenizer or writer can take it.</summary>
    public static string Text(JsonNode v, string param)
    {
        string s;
        try { s = v.GetValue<string>(); }
        catch (InvalidOperationException) { s = "\ud800"; } // System.Text.Json refuses to decode it: the same error below
        for (int i = 0; i < s.Length; i++)
            if (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1])) i++;
            else if (char.IsSurrogate(s[i])) throw new ApiError(400, $"\"{param}\" holds an unpaired UTF-16 surrogate (an escape like \\ud800 without its pair)", param);
        return s;
    }

    public static bool IsString(JsonNode? v) => v is JsonValue && v.GetValueKind() == JsonValueKind.String;

    static bool Is(JsonNode? v, JsonValueKind kind) => v is JsonValue && v.GetValueKind() == kind;

    public static string? Str(JsonObject o, string key, string? param = null)
    {
        var v = Field(o, key);
        if (v is null) return null;
        if (Is(v, JsonValueKind.String)) return Text(v, param ?? key);
        throw new ApiError(400, $"\"{param ?? key}\" must be a string, not {Kind(v)}", param ?? key);
    }

    public static bool? Bool(JsonObject o, string key, string? param = null)
    {
        var v = Field(o, key);
        if (v is null) return null;
        if (Is(v, JsonValueKind.True)) return true;
        if (Is(v, JsonValueKind.False)) return false;
        throw new ApiError(400, $"\"{param ?? key}\" must be true or false, not {Kind(v)}", param ?? key);
    }

    public static double? Number(JsonObject o, string key, double min, double max)
    {
        var v = Field(o, key);
        if (v is null) return null;
        if (!Is(v, JsonValueKind.Number)) throw new ApiError(400, $"\"{key}\" must be a number, not {Kind(v)}", key);
        if (!v.AsValue().TryGetValue<double>(out var d) || !double.IsFinite(d) || d < min || d > max)
            throw new ApiError(400, $"\"{key}\" must be a number between {min} and {max}", key);
        return d;
    }

    public static long? Integer(JsonObject o, string key, long min, long max)
    {
        var v = Field(o, key);
        if (v is null) return null;
        if (!Is(v, JsonValueKind.Number)) throw new ApiError(400, $"\"{key}\" must be an integer, not {Kind(v)}", key);
        long value;
        if (v.AsValue().TryGetValue<long>(out var l)) value = l;
        else if (v.AsValue().TryGetValue<double>(out var d) && double.IsFinite(d) && d == Math.Floor(d) && Math.Abs(d) < 9e18) value = (long)d; // 2.0, 1e3
        else throw new ApiError(400, $"\"{key}\" must be an integer between {min} and {max}", key);
        if (value < min || value > max) throw new ApiError(400, $"\"{key}\" must be an integer between {min} and {max}", key);
        return value;
    }

    public static JsonObject? Object(JsonObject o, string key)
    {
        var v = Field(o, key);
        if (v is null) return null;
        return v as JsonObject ?? throw new ApiError(400, $"\"{key}\" must be an object, not {Kind(v)}", key);
    }
}

/// <summary>The sampling and output fields of a /v1/completions or /v1/chat/completions body, validated.</summary>
public sealed record CompletionRequest(SamplingOptions Options, bool Stream, bool IncludeUsage, bool IgnoreEos)
{
    public static CompletionRequest Parse(JsonObject body, bool chat, ServerOptions o)
    {
        // max_completion_tokens is the chat API's newer name; either may be sent.
        string maxKey = chat && body["max_completion_tokens"] is not null ? "max_completion_tokens" : "max_tokens";
        int maxTokens = (int)(Json.Integer(body, maxKey, 1, o.MaxTokens) ?? (chat ? Math.Min(o.MaxTokens, 256) : Math.Min(o.MaxTokens, 16)));
        double temperature = Json.Number(body, "temperature", 0, 2) ?? 1.0;
        double topP = Json.Number(body, "top_p", 0, 1) ?? 1.0;
        if (topP <= 0) throw new ApiError(400, "\"top_p\" must be in (0, 1]", "top_p");
        long topK = Json.Integer(body, "top_k", -1, int.MaxValue) ?? 0; // vLLM's extension; -1 = off, as vLLM
        if (Json.Integer(body, "n", 1, 128) is long n && n != 1) throw new ApiError(400, "only \"n\": 1 is supported", "n");
        var stops = body["stop"] switch
        {
            null => [],
            JsonValue v when v.GetValueKind() == JsonValueKind.String => [Json.Text(v, "stop")],
            JsonArray a => a.Select((x, i) => Json.IsString(x) ? Json.Text(x!, "stop")
                : throw new ApiError(400, $"\"stop[{i}]\" must be a string, not {Json.Kind(x)}", "stop")).ToList(),
            var other => throw new ApiError(400, $"\"stop\" must be a string or an array of strings, not {Json.Kind(other)}", "stop"),
        };
        if (stops.Count > o.MaxStopStrings) throw new ApiError(400, $"at most {o.MaxStopStrings} stop strings", "stop");
        if (stops.Any(s => s.Length == 0)) throw new ApiError(400, "stop strings must not be empty", "stop");
        long? seed = Json.Integer(body, "seed", long.MinValue, long.MaxValue);
        // vLLM's extension: generate max_tokens whatever the model says (benchmarks, load tests).
        bool ignoreEos = Json.Bool(body, "ignore_eos") ?? false;
        bool stream = Json.Bool(body, "stream") ?? false;
        bool includeUsage = Json.Object(body, "stream_options") is { } so && (Json.Bool(so, "include_usage", "stream_options.include_usage") ?? false);

        // Fields that would change the answer and that this server does not implement: refused, never silently ignored.
        if (chat ? Json.Bool(body, "logprobs") == true : Json.Integer(body, "logprobs", 0, 20) is > 0)
            throw new ApiError(400, "\"logprobs\" is not supported by this server", "logprobs");
        if (Json.Integer(body, "top_logprobs", 0, 20) is > 0) throw new ApiError(400, "\"top_logprobs\" is not supported by this server", "top_logprobs");
        foreach (var key in new[] { "presence_penalty", "frequency_penalty" })
            if (Json.Number(body, key, -2, 2) is double p && p != 0) throw new ApiError(400, $"\"{key}\" is not supported by this server (only 0)", key);
        if (Json.Number(body, "repetition_penalty", 0, 10) is double rp && rp != 1) throw new ApiError(400, "\"repetition_penalty\" is not supported by this server (only 1)", "repetition_penalty");
        if (Json.Object(body, "logit_bias") is { Count: > 0 }) throw new ApiError(400, "\"logit_bias\" is not supported by this server", "logit_bias");
        if (body["tools"] is { } tools && tools is not JsonArray { Count: 0 }) throw new ApiError(400, "\"tools\" are not supported by this server", "tools");
        if (body["functions"] is not null) throw new ApiError(400, "\"functions\" are not supported by this server", "functions");
        if (body["tool_choice"] is { } tc && !(tc is JsonValue tv && tv.GetValueKind() == JsonValueKind.String && tv.GetValue<string>() is "none" or "auto"))
            throw new ApiError(400, "\"tool_choice\" is not supported by this server (only \"none\" or \"auto\")", "tool_choice");
        if (Json.Object(body, "response_format") is { } rf && Json.Str(rf, "type", "response_format.type") is not (null or "text"))
            throw new ApiError(400, "\"response_format\" other than text is not supported by this server", "response_format");
        if (Json.Bool(body, "echo") == true) throw new ApiError(400, "\"echo\" is not supported by this server", "echo");
        if (Json.Integer(body, "best_of", 1, 128) is > 1) throw new ApiError(400, "only \"best_of\": 1 is supported", "best_of");
        if (Json.Str(body, "suffix") is { Length: > 0 }) throw new ApiError(400, "\"suffix\" is not supported by this server", "suffix");
        Json.Str(body, "user");

        var options = new SamplingOptions
        {
            MaxNewTokens = maxTokens, Temperature = temperature, TopP = topP, TopK = (int)Math.Max(topK, 0), Seed = seed, StopStrings = stops,
        };
        return new CompletionRequest(options, stream, includeUsage, ignoreEos);
    }
}
