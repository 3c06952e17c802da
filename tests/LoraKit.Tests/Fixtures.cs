using System.Text.Json;
using LoraKit.IO;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>Paths to the committed fixtures (made by scripts/fixtures/make_fixtures.py with transformers).</summary>
public static class Fixtures
{
    public static readonly string[] Architectures = ["llama", "mistral", "qwen2", "qwen3"];
    public static readonly string[] Tokenizers = ["llama3", "qwen2", "qwen3", "llama2", "metaspace", "gpt2", "phi3", "phi4", "gemma"];

    public static string Root { get; } = FindRoot();

    static string FindRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "LoraKit.slnx"))) return d.FullName;
        // A published test program (the GPU tests' runner) lives outside the tree: it runs from the repository root.
        if (File.Exists(Path.Combine(Environment.CurrentDirectory, "LoraKit.slnx"))) return Environment.CurrentDirectory;
        throw new DirectoryNotFoundException("repository root (LoraKit.slnx) not found above the test binaries or in the current directory");
    }

    public static string Path_(params string[] parts) => Path.Combine([Root, "fixtures", .. parts]);

    public static string Model(string arch) => Path_("models", arch);

    public static JsonElement Json(params string[] parts)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path_(parts)));
        return doc.RootElement.Clone();
    }

    public static Tensor ReferenceTensor(string arch, string name)
    {
        using var f = SafetensorsFile.Open(Path_("reference", arch + ".safetensors"));
        return f.Read(name);
    }

    public static long[] Ids(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt64()).ToArray();

    /// <summary>A temporary copy of a directory's files (to edit a fixture without touching it).</summary>
    public static string CopyOf(string sourceDir, string? into = null)
    {
        var dir = into ?? TempDir();
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(sourceDir)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        return dir;
    }

    /// <summary>A fresh temporary directory, removed with the test's lifetime by the OS temp cleaner.</summary>
    public static string TempDir()
    {
        var d = Path.Combine(Path.GetTempPath(), "lorakit-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(d);
        return d;
    }
}

public static class Close
{
    /// <summary>max |a - b| relative to max |b|; the project's tolerance measure for logits.</summary>
    public static double RelError(Tensor actual, Tensor expected)
    {
        using var a = actual.to(ScalarType.Float64);
        using var b = expected.to(ScalarType.Float64);
        double diff = (a - b).abs().max().item<double>();
        double scale = b.abs().max().item<double>();
        return diff / Math.Max(scale, 1e-12);
    }
}

/// <summary>
/// Tests that seed or draw from torch's global CPU generator (dropout, manual_seed) run one at a time: xunit runs test
/// classes in parallel, and another class's draws would change their random streams.
/// </summary>
[CollectionDefinition(Name)]
public sealed class GlobalRng
{
    public const string Name = "global RNG";
}
