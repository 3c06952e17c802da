using System.Runtime.CompilerServices;

namespace LoraKit.Tests;

/// <summary>
/// Every <c>lorakit train</c> records its run in a registry (default ~/.lorakit/registry). Before any test runs, this
/// points <c>LORAKIT_REGISTRY</c> at a temporary folder for the whole test process, so no test (nor a CLI process a test
/// starts: children inherit the environment) writes to the home directory. Tests that check the registry pass their own.
/// </summary>
static class TestRegistry
{
    /// <summary>The process-wide registry folder the tests' unnamed registries go to.</summary>
    public static string Path { get; private set; } = "";

    [ModuleInitializer]
    internal static void PointAwayFromHome()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "lorakit-tests", $"registry-{Environment.ProcessId}");
        Environment.SetEnvironmentVariable(LoraKit.Registry.AdapterStore.EnvVar, Path);
    }
}
