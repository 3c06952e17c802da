using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Training;

/// <summary>
/// The output directory of a training run and what LoraKit wrote into it. <c>lorakit-run.json</c> (the manifest) lists
/// every file the run wrote, so that replacing a run (<c>overwrite</c>) or an earlier adapter deletes only those files:
/// whatever else is in the directory (the user's notes, a file dropped into adapter/) is never touched. A non-empty
/// directory that is not a LoraKit run is refused unless overwriting, and even then a file of the same name as one
/// LoraKit would write is refused rather than replaced. Debris of killed runs (<c>.tmp-*</c> directories, <c>*.tmp</c>
/// files) is ignored when deciding whether a directory is empty.
/// </summary>
public sealed class RunDirectory
{
    public const string ManifestFile = "lorakit-run.json";

    /// <summary>Top-level names a run writes; a foreign file with one of these names blocks a run into the directory.</summary>
    static readonly string[] RunNames = ["adapter", "model", "best", "last", "checkpoints", "metrics.jsonl", "report.html", "report.json", "loss.png", TensorBoardLog.Folder, ManifestFile];

    readonly string _root;
    readonly HashSet<string> _ours = new(StringComparer.Ordinal);
    readonly HashSet<string> _foreign = new(StringComparer.Ordinal);
    JsonObject _config = new();
    JsonObject? _initAdapter;

    RunDirectory(string root) { _root = Path.GetFullPath(root); }

    public string Root => _root;

    /// <summary>
    /// The adapter the run started from (<c>init_adapter</c>: path, sha256 and, when it was named, the registry ref), kept
    /// in the manifest so that a resumed run, and whoever registers its adapter, still know its parent. Setting it
    /// rewrites the manifest; a new or overwritten run starts without one.
    /// </summary>
    public JsonObject? InitAdapter
    {
        get => _initAdapter;
        set { _initAdapter = value; WriteManifest(); }
    }

    /// <summary>The files (relative paths) this run and its predecessors in the directory wrote.</summary>
    public IReadOnlyCollection<string> Files => _ours;

    static bool IsDebris(string name) => name.StartsWith(".tmp-", StringComparison.Ordinal) || name.EndsWith(".tmp", StringComparison.Ordinal)
                                          || name.Contains(".tmp-", StringComparison.Ordinal);

    /// <summary>
    /// Opens <paramref name="output"/> for a run. <paramref name="resume"/>: continue what is there; <paramref name="overwrite"/>:
    /// delete what an earlier LoraKit run wrote (only that) and start again. Otherwise the directory must be empty (or
    /// absent). <paramref name="describeExisting"/> is asked for a description of an existing run for the error message.
    /// </summary>
    public static RunDirectory Open(string output, JsonObject config, bool resume, bool overwrite, Func<string, string?>? describeExisting = null)
    {
        if (File.Exists(output)) throw new LoraKitException($"output '{output}' is a file, not a directory");
        var run = new RunDirectory(output);
        run._config = config;
        Directory.CreateDirectory(output);
        var manifest = Path.Combine(run._root, ManifestFile);
        bool isRun = File.Exists(manifest);
        if (isRun) run.ReadManifest(manifest);
        if (!resume) run._initAdapter = null; // a new run's parent is its own
        bool legacyRun = !isRun && Checkpoints.Latest(output) is not null; // a run from before the manifest existed
        var present = Directory.EnumerateFiles(run._root, "*", SearchOption.AllDirectories).Select(run.Relative).ToList();
        foreach (var f in present.Where(f => !run._ours.Contains(f) && f != ManifestFile)) run._foreign.Add(f);
        if (resume)
        {
            if (!isRun && !legacyRun) throw new LoraKitException($"{output} holds no LoraKit run to resume");
            return run;
        }
        // Files (at any depth) that are neither debris nor what a run that never got going wrote (its manifest only).
        var meaningful = present.Where(f => f != ManifestFile && !f.Split(Path.DirectorySeparatorChar).Any(IsDebris)).ToList();
        if (meaningful.Count == 0) { run.WriteManifest(); return run; }
        if (!overwrite)
        {
            string what = isRun || legacyRun
                ? $"already holds a LoraKit run{(describeExisting?.Invoke(run._root) is string d ? $" ({d})" : "")}; resume it (`resume`) or replace what it wrote (`overwrite`)"
                : $"is not empty and holds no LoraKit run ({string.Join(", ", meaningful.Take(3))}{(meaningful.Count > 3 ? ", …" : "")}); choose an empty or new directory, or `overwrite` to write beside those files";
            throw new LoraKitException($"output directory {output} {what}");
        }
        // overwrite: nothing foreign may sit where the run writes its top-level files.
        if (legacyRun && !isRun) run.AdoptLegacy();
        var clash = run._foreign.FirstOrDefault(f => RunNames.Contains(f) || IsCheckpointFile(f));
        if (clash is not null)
            throw new LoraKitException($"output directory {output}: {clash} was not written by LoraKit and would be replaced; move it away or choose another directory");
        foreach (var dir in RunNames) run.Clear(Path.Combine(run._root, dir));
        run._ours.Clear();
        run.WriteManifest();
        return run;
    }

    static readonly string[] CheckpointFileNames = ["COMPLETE", "trainer_state.json", "optimizer.safetensors", "adapter_model.safetensors", "adapter_config.json", "model.safetensors", SequenceClassifier.LabelsFile];

    static bool IsCheckpointFile(string rel)
    {
        var parts = rel.Split(Path.DirectorySeparatorChar);
        return parts.Length == 3 && parts[0] == "checkpoints" && CheckpointFileNames.Contains(parts[2]);
    }

    /// <summary>A run written before the manifest existed: its checkpoint files and top-level reports count as LoraKit's.</summary>
    void AdoptLegacy()
    {
        foreach (var f in _foreign.ToList())
        {
            var parts = f.Split(Path.DirectorySeparatorChar);
            bool ours = IsCheckpointFile(f) || (parts.Length == 1 && RunNames.Contains(parts[0]))
                        || (parts.Length == 2 && parts[0] is "adapter" or "best" or "last" && parts[1] is "adapter_model.safetensors" or "adapter_config.json");
            if (ours) { _foreign.Remove(f); _ours.Add(f); }
        }
    }

    string Relative(string path) => Path.GetRelativePath(_root, Path.GetFullPath(path));

    void ReadManifest(string path)
    {
        try
        {
            var o = JsonNode.Parse(IO.JsonFiles.ReadText(path)) as JsonObject ?? throw new JsonException("not an object");
            foreach (var f in o["files"]?.AsArray() ?? []) if (f?.GetValue<string>() is string s && !s.Contains("..")) _ours.Add(s.Replace('/', Path.DirectorySeparatorChar));
            _initAdapter = o["init_adapter"] is JsonObject init ? (JsonObject)init.DeepClone() : null;
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
        {
            throw new LoraKitException($"{path}: unreadable run manifest ({(e is JsonException ? "invalid JSON" : "\"files\" must be a list of relative paths")}); move the directory aside or remove the file");
        }
    }

    void WriteManifest()
    {
        var o = new JsonObject
        {
            ["version"] = 1,
            ["written_by"] = "LoraKit",
            ["config"] = _config.DeepClone(),
            ["files"] = new JsonArray(_ours.Order(StringComparer.Ordinal).Select(f => (JsonNode)f.Replace(Path.DirectorySeparatorChar, '/')).ToArray()),
        };
        if (_initAdapter is not null) o["init_adapter"] = _initAdapter.DeepClone();
        var path = Path.Combine(_root, ManifestFile);
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Move(tmp, path, overwrite: true);
    }

    /// <summary>Records every file now under <paramref name="path"/> (a file or a directory) that was not there as someone else's.</summary>
    public void Record(string path)
    {
        var full = Path.GetFullPath(path);
        IEnumerable<string> files = File.Exists(full) ? [full] : Directory.Exists(full) ? Directory.EnumerateFiles(full, "*", SearchOption.AllDirectories) : [];
        foreach (var f in files)
        {
            var rel = Relative(f);
            if (!_foreign.Contains(rel) && !IsDebris(Path.GetFileName(rel))) _ours.Add(rel);
        }
        WriteManifest();
    }

    /// <summary>Whether a file inside the run directory was written by LoraKit (per the manifest).</summary>
    public bool IsOurs(string path) => _ours.Contains(Relative(path));

    /// <summary>
    /// Deletes what LoraKit wrote under <paramref name="path"/> (file or directory) and the directories this leaves
    /// empty; files it did not write stay. Returns whether <paramref name="path"/> is gone.
    /// </summary>
    public bool Clear(string path)
    {
        var full = Path.GetFullPath(path);
        if (File.Exists(full))
        {
            if (_ours.Remove(Relative(full))) File.Delete(full);
        }
        else if (Directory.Exists(full))
        {
            foreach (var f in Directory.EnumerateFiles(full, "*", SearchOption.AllDirectories).ToList())
                if (_ours.Remove(Relative(f))) File.Delete(f);
            RemoveEmptyDirs(full);
        }
        else
        {
            var rel = Relative(full) + Path.DirectorySeparatorChar;
            _ours.RemoveWhere(f => f.StartsWith(rel, StringComparison.Ordinal));
        }
        WriteManifest();
        return !File.Exists(full) && !Directory.Exists(full);
    }

    /// <summary>Deletes the known files of a LoraKit temporary directory (debris of a killed write) and the directory if that empties it.</summary>
    public static void ClearDebris(string dir)
    {
        if (!Directory.Exists(dir)) return;
        foreach (var f in Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories).ToList())
        {
            var name = Path.GetFileName(f);
            if (CheckpointFileNames.Contains(name) || name.EndsWith(".safetensors.tmp", StringComparison.Ordinal) || name == SequenceClassifier.LabelsFile) File.Delete(f);
        }
        RemoveEmptyDirs(dir);
    }

    static void RemoveEmptyDirs(string dir)
    {
        foreach (var sub in Directory.GetDirectories(dir)) RemoveEmptyDirs(sub);
        if (!Directory.EnumerateFileSystemEntries(dir).Any()) Directory.Delete(dir);
    }
}
