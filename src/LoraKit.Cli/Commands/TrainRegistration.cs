using LoraKit.Registry;
using LoraKit.Training;

namespace LoraKit.Cli.Commands;

/// <summary>
/// The registry's part in <c>lorakit train</c> (the trainer itself knows no registry): an <c>init_adapter</c> given as
/// NAME@VERSION / NAME@ALIAS becomes a verified checkout whose NAME@VERSION the run records, <c>register</c> is checked
/// before any training, and a finished run's adapter is added with the run's lineage. A registry that fails after
/// training leaves the adapter on disk and says so.
/// </summary>
public static class TrainRegistration
{
    /// <summary>
    /// Resolves c's init adapter when it names a registered version (c then holds the checkout folder) and returns that
    /// version's NAME@VERSION, or null for a folder; checks the register name and opens (creating) its registry.
    /// </summary>
    public static string? Prepare(TrainConfig c)
    {
        if (c.Register is { } name)
        {
            RegistryRef.CheckName(name);
            if (c.Method != "lora") throw new LoraKitException($"register: the registry holds LoRA adapters; method {c.Method} writes a full model");
            using var _ = AdapterStore.Open(c.Registry); // a registry that cannot open fails now, not after the run
        }
        if (c.InitAdapter is not { } value) return null;
        var (dir, version) = AdapterArgument.ResolveVersion(value, c.Registry);
        c.InitAdapter = dir;
        return version?.Ref;
    }

    /// <summary>Adds the run's final adapter as the next version of c's register name, with the run's lineage, and prints it.</summary>
    public static void Register(TrainConfig c, TrainResult result)
    {
        AdapterVersion v;
        AdapterStore? store = null;
        try
        {
            store = AdapterStore.Open(c.Registry);
            v = store.Add(c.Register!, result.AdapterDir, runDir: result.OutputDir);
        }
        catch (Exception e) when (e is LoraKitException or IOException or UnauthorizedAccessException or Microsoft.Data.Sqlite.SqliteException)
        {
            store?.Dispose();
            throw new LoraKitException($"training finished and the adapter is in {result.AdapterDir}, but registering it as {c.Register} failed: {e.Message.ReplaceLineEndings(" ")}");
        }
        using (store)
        {
            Console.Write("registered ");
            RegistryCommand.PrintAdded(store, v, json: false);
        }
    }
}
