using System.Text.Json;
using static TorchSharp.torch;

namespace LoraKit.IO;

/// <summary>
/// The weights of a Hugging Face checkpoint directory: one <c>model.safetensors</c> or shards listed by
/// <c>model.safetensors.index.json</c>. Every shard is opened (and validated) up front; tensors are read on demand.
/// </summary>
public sealed class CheckpointFiles : IDisposable
{
    readonly Dictionary<string, SafetensorsFile> _fileOf = new(StringComparer.Ordinal);
    readonly List<SafetensorsFile> _files = [];

    public IReadOnlyCollection<string> Names => _fileOf.Keys;

    public static CheckpointFiles Open(string dir)
    {
        var single = Path.Combine(dir, "model.safetensors");
        var index = Path.Combine(dir, "model.safetensors.index.json");
        var ckpt = new CheckpointFiles();
        try
        {
            if (File.Exists(single)) ckpt.Add(SafetensorsFile.Open(single), null);
            else if (File.Exists(index)) ckpt.AddSharded(dir, index);
            else if (Directory.Exists(dir) && Directory.EnumerateFiles(dir, "*.bin").Any())
                throw new InvalidDataException($"{dir}: only PyTorch .bin weights found; LoraKit reads safetensors only (pickle files can run code)");
            else
                throw new FileNotFoundException($"{dir}: no model.safetensors or model.safetensors.index.json");
            return ckpt;
        }
        catch { ckpt.Dispose(); throw; }
    }

    void AddSharded(string dir, string indexPath)
    {
        var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
        using (var doc = JsonFiles.Parse(indexPath))
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("weight_map", out var wm) || wm.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"{indexPath}: not a valid safetensors index (no 'weight_map' object)");
            foreach (var p in wm.EnumerateObject())
                weightMap[p.Name] = p.Value.ValueKind == JsonValueKind.String && p.Value.GetString() is { Length: > 0 } f ? f
                    : throw new InvalidDataException($"{indexPath}: weight_map entry '{p.Name}' must name a shard file, got {JsonFiles.KindOf(p.Value)}");
        }
        foreach (var shard in weightMap.Values.Distinct())
        {
            if (shard.Contains('/') || shard.Contains('\\') || shard.Contains(".."))
                throw new InvalidDataException($"{indexPath}: shard name '{shard}' must be a plain file name");
            var expected = weightMap.Where(kv => kv.Value == shard).Select(kv => kv.Key).ToHashSet();
            Add(SafetensorsFile.Open(Path.Combine(dir, shard)), expected);
        }
        var missing = weightMap.Keys.Where(k => !_fileOf.ContainsKey(k)).ToList();
        if (missing.Count > 0)
            throw new InvalidDataException($"{indexPath}: tensor '{missing[0]}' is listed in the index but not in shard '{weightMap[missing[0]]}'");
    }

    void Add(SafetensorsFile file, HashSet<string>? listed)
    {
        _files.Add(file);
        foreach (var name in file.Entries.Keys)
        {
            if (listed != null && !listed.Contains(name)) continue; // the index decides which shard owns a name
            if (_fileOf.ContainsKey(name))
                throw new InvalidDataException($"{file.Path}: tensor '{name}' appears in more than one shard");
            _fileOf[name] = file;
        }
    }

    public bool Contains(string name) => _fileOf.ContainsKey(name);

    public SafetensorsEntry Entry(string name) => _fileOf[name].Entries[name];

    /// <summary>The safetensors file that holds <paramref name="name"/>.</summary>
    public string PathOf(string name) => _fileOf[name].Path;

    /// <summary>Reads one tensor and converts it to the given dtype and device.</summary>
    public Tensor Read(string name, ScalarType dtype, Device device)
    {
        if (!_fileOf.TryGetValue(name, out var file)) throw new KeyNotFoundException($"checkpoint has no tensor '{name}'");
        using var raw = file.Read(name);
        return raw.to(dtype, device);
    }

    /// <summary>Reads one tensor in its stored dtype, on the CPU (quantized checkpoints keep their bytes as they are).</summary>
    public Tensor ReadStored(string name) =>
        _fileOf.TryGetValue(name, out var file) ? file.Read(name) : throw new KeyNotFoundException($"checkpoint has no tensor '{name}'");

    /// <summary>Up to <paramref name="count"/> evenly spaced elements of a tensor in its stored dtype (see <see cref="SafetensorsFile.ReadSample"/>).</summary>
    public Tensor ReadSample(string name, int count) =>
        _fileOf.TryGetValue(name, out var file) ? file.ReadSample(name, count) : throw new KeyNotFoundException($"checkpoint has no tensor '{name}'");

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
        _files.Clear();
    }
}
