using System.Text.Json;
using System.Text.RegularExpressions;
using LoraKit.Training;

namespace LoraKit.Cli.Commands;

/// <summary>
/// The library names a setting by its key in backquotes (<c>`cuda_graph`</c>, see <see cref="TrainConfig"/>); the CLI
/// says the flag that sets it (<c>--cuda-graph</c>; <c>--no-shuffle</c> for a switch that is on by default), so a
/// message points at what the user typed. Backquoted words that are no setting stay as they are.
/// </summary>
public static partial class FlagNames
{
    static readonly Dictionary<string, string> Flags = Build();

    static Dictionary<string, string> Build()
    {
        var defaults = new TrainConfig();
        var flags = new Dictionary<string, string>(StringComparer.Ordinal) { ["resume"] = "--resume", ["overwrite"] = "--overwrite" };
        // The evaluation gate's thresholds (Evaluation.GateThresholds) are eval's flags of the same names.
        foreach (var key in new[] { "max_safety_regressions", "max_capability_drop", "max_perplexity_increase", "min_task_score" }) flags[key] = "--" + key.Replace('_', '-');
        foreach (var p in typeof(TrainConfig).GetProperties())
        {
            string key = JsonNamingPolicy.SnakeCaseLower.ConvertName(p.Name);
            bool onByDefault = p.PropertyType == typeof(bool) && (bool)p.GetValue(defaults)!;
            flags[key] = (onByDefault ? "--no-" : "--") + key.Replace('_', '-');
        }
        return flags;
    }

    /// <summary><paramref name="message"/> with every backquoted setting key replaced by its flag.</summary>
    public static string Rephrase(string message) =>
        SettingKey().Replace(message, m => Flags.TryGetValue(m.Groups[1].Value, out var flag) ? flag : m.Value);

    [GeneratedRegex("`([a-z0-9_]+)`")]
    private static partial Regex SettingKey();
}
