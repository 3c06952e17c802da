using System.Text.RegularExpressions;

namespace LoraKit.IO;

/// <summary>Checks that a model path names a local directory, and says what to do when it names a hub model instead.</summary>
public static partial class ModelDirectory
{
    [GeneratedRegex(@"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
    private static partial Regex HubId();

    /// <summary>True for "owner/name" (a Hugging Face Hub id) that is not a local path.</summary>
    public static bool LooksLikeHubId(string path) => !Directory.Exists(path) && !File.Exists(path) && HubId().IsMatch(path)
        && !path.StartsWith("..", StringComparison.Ordinal);

    /// <summary>Throws a <see cref="LoraKitException"/> unless <paramref name="dir"/> is an existing directory.</summary>
    public static void Require(string dir)
    {
        if (Directory.Exists(dir)) return;
        if (File.Exists(dir))
            throw new LoraKitException($"'{dir}' is a file; a model is a directory (config.json, *.safetensors, tokenizer.json)");
        if (LooksLikeHubId(dir))
            throw new LoraKitException($"'{dir}' is not a local directory; it looks like a Hugging Face hub id, which " +
                $"LoraKitModel.FromPretrained and the CLI's --model download into the hub cache; this loader takes a folder: " +
                $"the snapshot folder that `lorakit download {dir}` prints (LoraKit.Hub.HubDownloader.Download)");
        throw new LoraKitException($"model directory '{dir}' does not exist");
    }
}
