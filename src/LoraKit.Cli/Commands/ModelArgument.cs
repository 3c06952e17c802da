using LoraKit.Hub;

namespace LoraKit.Cli.Commands;

/// <summary>
/// A <c>--model</c> value: a local model directory, or (when no such path exists) a Hugging Face hub id
/// <c>ORG/NAME[@REVISION]</c>, downloaded into the hub cache shared with <c>huggingface_hub</c> (HF_HOME, HF_HUB_CACHE,
/// HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) with progress lines on stderr; the snapshot folder is what loads.
/// </summary>
public static class ModelArgument
{
    /// <summary>The local directory for the model <paramref name="value"/> names.</summary>
    public static string Resolve(string value) => HubDownloader.ResolveLocalOrHub(value, HubFileSet.Model, Settings());

    /// <summary>The local directory for the adapter hub id <paramref name="value"/>, or null when it is not shaped like one.</summary>
    public static string? ResolveAdapter(string value) =>
        HubRepoId.TryParse(value) is null ? null : HubDownloader.ResolveLocalOrHub(value, HubFileSet.Adapter, Settings());

    /// <summary>The name a served model is listed by: the hub id's ORG/NAME (not its snapshot folder's commit sha), or null for a local folder.</summary>
    public static string? HubName(string value) =>
        !Directory.Exists(value) && HubRepoId.TryParse(value) is { } id ? id.Repo : null;

    /// <summary>The environment's hub settings, reporting progress as plain lines on stderr.</summary>
    public static HubSettings Settings() => HubSettings.FromEnvironment() with { Progress = new HubProgressLines(Console.Error) };
}
