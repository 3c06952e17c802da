using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraKit.Training;

/// <summary>One (step, value) point of a metric's curve.</summary>
public readonly record struct MetricPoint(int Step, double Value);

/// <summary>
/// What a finished (or stopped) <c>lorakit train</c> run directory says about the run, read back from its files only:
/// <c>lorakit-run.json</c> (the manifest, with the config), <c>metrics.jsonl</c> (the curves) and, when the run got to
/// the end, <c>report.json</c> (wall time, start and end, device, tokens/s, peak memory, cost, data). Nothing is recomputed: a data hash or peak memory appears only when
/// the run recorded it. A directory without the manifest is not a run; a metrics line that is not a JSON object is an
/// error naming <c>file:line</c> (a last line cut off by a kill, without its newline, is left out as the trainer's
/// resume does).
/// </summary>
public sealed class RunSummary
{
    /// <summary>The run's name for tables and legends: its directory's name.</summary>
    public required string Name { get; init; }
    /// <summary>The run directory, full path.</summary>
    public required string Directory { get; init; }
    /// <summary>The run's configuration as <c>lorakit train</c> recorded it (TrainConfig's JSON names).</summary>
    public required JsonObject Config { get; init; }
    /// <summary>The base model directory (config <c>model</c>).</summary>
    public string? BaseModel => Config["model"]?.GetValue<string>();
    /// <summary>Whether the run wrote its end-of-run report (it finished or stopped early, not killed).</summary>
    public bool Finished { get; init; }
    /// <summary>Optimizer steps taken (the report's, else the last logged step).</summary>
    public int Steps { get; init; }
    /// <summary>Wall-clock seconds (the report's, else the last logged <c>elapsed_s</c>).</summary>
    public double? WallSeconds { get; init; }
    /// <summary>Tokens trained on (cumulative, from the last logged step).</summary>
    public long? Tokens { get; init; }
    /// <summary>
    /// Tokens per second: the report's (the training loop of the run's last process, model load left out), else
    /// <see cref="Tokens"/> / the last logged <c>elapsed_s</c>.
    /// </summary>
    public double? TokensPerSecond { get; init; }
    /// <summary>Peak memory in GiB, when the run recorded it (report.json <c>peak_memory_gib</c>); <see cref="PeakMemoryKind"/> says of what.</summary>
    public double? PeakMemoryGib { get; init; }
    /// <summary><c>cuda_max_allocated</c> (libtorch's allocator) or <c>process_peak_working_set</c> (the process, on CPU).</summary>
    public string? PeakMemoryKind { get; init; }
    /// <summary>When the run's last process started and ended (ISO-8601 UTC, report.json), or null.</summary>
    public string? Started { get; init; }
    /// <inheritdoc cref="Started"/>
    public string? Ended { get; init; }
    /// <summary>"cpu" or "cuda:N" (report.json <c>device</c>), the GPU's name and the base's dtype, when recorded.</summary>
    public string? Device { get; init; }
    /// <inheritdoc cref="Device"/>
    public string? DeviceName { get; init; }
    /// <inheritdoc cref="Device"/>
    public string? DType { get; init; }
    /// <summary>The cost report.json recorded (wall hours × <c>gpu_hour_cost</c>), or null when no rate was given.</summary>
    public double? Cost { get; init; }
    /// <summary>The training data as report.json describes it (path, samples, tokens; a <c>sha256</c> when recorded).</summary>
    public JsonObject? Data { get; init; }
    /// <summary>The validation data as report.json describes it (null when the run held out a fraction of <see cref="Data"/> or had none).</summary>
    public JsonObject? Validation { get; init; }
    /// <summary>The adapter the run started from (<c>init_adapter</c>: path, sha256, ref), or null for a fresh adapter.</summary>
    public JsonObject? InitAdapter { get; init; }
    /// <summary>Training loss by step.</summary>
    public required IReadOnlyList<MetricPoint> TrainLoss { get; init; }
    /// <summary>Evaluation metrics by step: <c>eval_loss</c>, <c>eval_ppl</c>, <c>eval_accuracy</c>, <c>suite:*</c>.</summary>
    public required IReadOnlyDictionary<string, IReadOnlyList<MetricPoint>> Evals { get; init; }
    /// <summary>The evaluation the run marked best (<c>is_best</c>, the last so marked): metric → value.</summary>
    public required IReadOnlyDictionary<string, double> Best { get; init; }
    /// <summary>The step of <see cref="Best"/>, or null when no evaluation was marked best.</summary>
    public int? BestStep { get; init; }

    /// <summary>The final train loss and the last value of each evaluation metric.</summary>
    public IReadOnlyDictionary<string, double> Final
    {
        get
        {
            var d = new SortedDictionary<string, double>(StringComparer.Ordinal);
            if (TrainLoss.Count > 0) d["train_loss"] = TrainLoss[^1].Value;
            foreach (var (name, points) in Evals) if (points.Count > 0) d[name] = points[^1].Value;
            return d;
        }
    }

    /// <summary>The summary as JSON (<c>runs show --json</c>, <c>runs compare --json</c>); curves are left out.</summary>
    public JsonObject ToJson() => new()
    {
        ["name"] = Name, ["directory"] = Directory, ["base_model"] = BaseModel, ["finished"] = Finished, ["steps"] = Steps,
        ["wall_seconds"] = WallSeconds, ["tokens"] = Tokens, ["tokens_per_s"] = TokensPerSecond is double t ? Math.Round(t, 1) : null,
        ["peak_memory_gib"] = PeakMemoryGib, ["peak_memory_kind"] = PeakMemoryKind, ["started"] = Started, ["ended"] = Ended,
        ["device"] = Device, ["device_name"] = DeviceName, ["dtype"] = DType, ["cost"] = Cost,
        ["data"] = Data?.DeepClone(), ["validation"] = Validation?.DeepClone(),
        ["final"] = Obj(Final), ["best"] = BestStep is null ? null : Obj(Best), ["best_step"] = BestStep,
        ["config"] = Config.DeepClone(),
    };

    static JsonObject Obj(IReadOnlyDictionary<string, double> d) => new(d.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value)));

    /// <summary>Reads the run in <paramref name="dir"/>; throws <see cref="LoraKitException"/> naming the file (and line) at fault.</summary>
    public static RunSummary Load(string dir)
    {
        if (File.Exists(dir)) throw new LoraKitException($"{dir} is a file, not a run directory");
        if (!System.IO.Directory.Exists(dir)) throw new LoraKitException($"{dir}: no such run directory");
        var manifest = Path.Combine(dir, RunDirectory.ManifestFile);
        if (!File.Exists(manifest)) throw new LoraKitException($"{dir} is not a LoraKit run directory (no {RunDirectory.ManifestFile})");
        var manifestJson = ReadObject(manifest);
        var config = manifestJson["config"] as JsonObject
                     ?? throw new LoraKitException($"{manifest}: no \"config\" object; was it written by `lorakit train`?");
        var reportPath = Path.Combine(dir, "report.json");
        var report = File.Exists(reportPath) ? ReadObject(reportPath) : null;
        var records = ReadRecords(Path.Combine(dir, "metrics.jsonl"));
        return Build(dir, config, report, records, (report?["init_adapter"] ?? manifestJson["init_adapter"]) as JsonObject);
    }

    static RunSummary Build(string dir, JsonObject config, JsonObject? report, List<JsonObject> records, JsonObject? initAdapter)
    {
        var train = new List<MetricPoint>();
        var evals = new SortedDictionary<string, IReadOnlyList<MetricPoint>>(StringComparer.Ordinal);
        var best = new SortedDictionary<string, double>(StringComparer.Ordinal);
        int? bestStep = null;
        JsonObject? lastStep = null;
        foreach (var o in records)
        {
            int step = Int(o["step"]) ?? 0;
            if (o.ContainsKey("loss")) { lastStep = o; if (Num(o["loss"]) is double l) train.Add(new(step, l)); continue; }
            bool isBest = o["is_best"] is JsonValue b && b.TryGetValue<bool>(out var bb) && bb;
            if (isBest) { best.Clear(); bestStep = step; }
            foreach (var (name, node) in o)
            {
                if (name is "step" or "is_best" || Num(node) is not double x) continue;
                ((List<MetricPoint>)(evals.TryGetValue(name, out var list) ? list : evals[name] = new List<MetricPoint>())).Add(new(step, x));
                if (isBest) best[name] = x;
            }
        }
        double? elapsed = Num(lastStep?["elapsed_s"]);
        long? tokens = (report?["tokens"] ?? lastStep?["tokens"]) is JsonValue t && t.TryGetValue<long>(out var tv) ? tv : null;
        return new RunSummary
        {
            Name = Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(dir))),
            Directory = Path.GetFullPath(dir),
            Config = config,
            Finished = report is not null,
            Steps = Int(report?["steps"]) ?? (lastStep is null ? 0 : Int(lastStep["step"]) ?? 0),
            WallSeconds = Num(report?["wall_seconds"]) ?? elapsed,
            Tokens = tokens,
            TokensPerSecond = Num(report?["tokens_per_s"]) ?? (tokens is long n && elapsed is double e && e > 0 ? n / e : null),
            PeakMemoryGib = Num(report?["peak_memory_gib"]),
            PeakMemoryKind = Str(report?["peak_memory_kind"]),
            Started = Str(report?["started"]), Ended = Str(report?["ended"]),
            Device = Str(report?["device"]), DeviceName = Str(report?["device_name"]), DType = Str(report?["dtype"]),
            Cost = Num(report?["cost"]),
            Data = report?["data"] as JsonObject,
            Validation = report?["validation"] as JsonObject,
            InitAdapter = initAdapter?.DeepClone() as JsonObject,
            TrainLoss = train, Evals = evals, Best = best, BestStep = bestStep,
        };
    }

    static JsonObject ReadObject(string path)
    {
        try { return JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new LoraKitException($"{path}: not a JSON object"); }
        catch (JsonException e) { throw new LoraKitException($"{path}: invalid JSON ({e.Message.Split('.')[0]})"); }
    }

    /// <summary>metrics.jsonl's records; an absent file (a run that never logged a step) has none.</summary>
    static List<JsonObject> ReadRecords(string path)
    {
        var records = new List<JsonObject>();
        if (!File.Exists(path)) return records;
        var text = File.ReadAllText(path);
        var lines = text.Split('\n');
        for (int i = 0; i < lines.Length; i++)
        {
            var line = lines[i].TrimEnd('\r');
            if (line.Trim().Length == 0) continue;
            bool cutOff = i == lines.Length - 1; // no newline after it: the write was interrupted
            JsonObject? o = null;
            try { o = JsonNode.Parse(line) as JsonObject; }
            catch (JsonException) when (cutOff) { continue; }
            catch (JsonException) { }
            if (o is null || (o["step"] is not null && Int(o["step"]) is null))
                throw new LoraKitException($"{path}:{i + 1}: not a metrics record (a JSON object with an integer \"step\")");
            records.Add(o);
        }
        return records;
    }

    static double? Num(JsonNode? n) => n is JsonValue v && v.TryGetValue<double>(out var x) && double.IsFinite(x) ? x : null;

    static string? Str(JsonNode? n) => n is JsonValue v && v.TryGetValue<string>(out var x) ? x : null;

    static int? Int(JsonNode? n) => n is JsonValue v && v.TryGetValue<int>(out var x) ? x : null;
}
