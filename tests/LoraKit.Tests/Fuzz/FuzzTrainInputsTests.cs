using System.Text;
using System.Text.Json;
using LoraKit.Data;
using LoraKit.Tokenization;
using LoraKit.Training;

namespace LoraKit.Tests.Fuzz;

/// <summary>
/// Training inputs, generated systematically: JSONL lines (every field × wrong types, invalid UTF-8, BOM, empty and huge
/// lines, missing fields, malformed chat messages, mixed formats, truncation at every offset), train configs in JSON
/// and YAML (every key × wrong types, unknown keys, anchors and aliases, deep nesting, duplicate keys, tabs,
/// truncation), and output-directory states (foreign files, debris, a file instead of a directory, a corrupt manifest
/// or checkpoint). Each must end in success or a clean error, and nothing that LoraKit did not write may change.
/// </summary>
[Collection(GlobalRng.Name)]
public class FuzzTrainInputsTests
{
    /// <summary>Runs every case, collecting the failures, so one report lists all of them (and the tally counts every case).</summary>
    static void All(IEnumerable<(string name, Action act)> cases, string area)
    {
        var failures = new List<string>();
        int n = 0;
        foreach (var (name, act) in cases)
        {
            n++;
            try { FuzzContract.Check(area, name, act); }
            catch (Xunit.Sdk.XunitException e) { failures.Add(e.Message); }
        }
        Assert.True(n > 0);
        Assert.True(failures.Count == 0, $"{failures.Count} of {n} {area} cases not handled cleanly:\n" + string.Join("\n", failures.Take(30)));
    }

    // ---- JSONL ----

    static readonly string[] WrongValues =
    [
        "null", "1", "-1.5e300", "true", "false", "[]", "{}", "\"\"", "[1, 2]", "{\"a\": 1}", "\"\\ud800\"", "\"\\u0000\"", "[[[[[[[[[[]]]]]]]]]]",
        "\"" + new string('x', 20_000) + "\"", "123456789012345678901234567890",
    ];

    static readonly string[] ValidLines =
    [
        "{\"text\": \"hello world\"}",
        "{\"prompt\": \"2+2=\", \"completion\": \" 4\"}",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}",
        "{\"text\": \"reset my password\", \"label\": \"accounts\"}",
    ];

    static IEnumerable<(string name, byte[] content)> JsonlCases()
    {
        var rng = FuzzContract.Rng("train-jsonl");
        // every field of every format × wrong types
        foreach (var line in ValidLines)
        {
            using var doc = JsonDocument.Parse(line);
            foreach (var field in doc.RootElement.EnumerateObject().Select(p => p.Name))
            {
                foreach (var w in WrongValues)
                    yield return ($"{field}={Trunc(w)} in {Trunc(line)}", Bytes(Replace(line, field, w)));
                yield return ($"missing {field} in {Trunc(line)}", Bytes(Remove(line, field)));
            }
        }
        // chat messages malformed
        string[] messages =
        [
            "[]", "[1]", "[null]", "[{}]", "[{\"role\": 5, \"content\": \"x\"}]", "[{\"role\": \"user\"}]", "[{\"role\": \"user\", \"content\": null}]",
            "[{\"role\": \"wizard\", \"content\": \"x\"}]", "[{\"role\": \"user\", \"content\": \"only a user\"}]",
            "[{\"role\": \"assistant\", \"content\": \"\"}]", "[{\"role\": \"assistant\", \"content\": [\"parts\"]}]",
            "[{\"role\": \"user\", \"content\": \"a\", \"extra\": {\"deep\": [1]}}, {\"role\": \"assistant\", \"content\": \"b\"}]",
            "[{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"assistant\", \"content\": \"b\"}]",
            "{\"role\": \"user\", \"content\": \"x\"}",
        ];
        foreach (var m in messages) yield return ($"messages={Trunc(m)}", Bytes($"{{\"messages\": {m}}}"));
        // invalid UTF-8 at the start, middle and end of a valid line; BOM; NUL; CR
        byte[][] bad = [[0xFF], [0xC3], [0xC3, 0x28], [0xE2, 0x82], [0xF0, 0x9F, 0x98], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0x80]];
        foreach (var b in bad)
            foreach (var line in ValidLines)
            {
                var v = Encoding.UTF8.GetBytes(line);
                int mid = line.IndexOf(':') + 3;
                yield return ($"utf8 {Convert.ToHexString(b)} inside {Trunc(line)}", [.. v[..mid], .. b, .. v[mid..], (byte)'\n']);
                yield return ($"utf8 {Convert.ToHexString(b)} before {Trunc(line)}", [.. b, .. v, (byte)'\n']);
            }
        yield return ("BOM then line", [.. Encoding.UTF8.Preamble, .. Bytes(ValidLines[0])]);
        yield return ("BOM on line 2", [.. Bytes(ValidLines[0]), .. Encoding.UTF8.Preamble, .. Bytes(ValidLines[0])]);
        yield return ("empty file", []);
        yield return ("only blank lines", Bytes("\n\n   \n\t\n"));
        yield return ("CRLF", Bytes(ValidLines[1] + "\r\n" + ValidLines[1] + "\r\n"));
        yield return ("NUL bytes", [0, 0, 0, (byte)'\n', .. Bytes(ValidLines[0])]);
        yield return ("no final newline", Encoding.UTF8.GetBytes(ValidLines[0]));
        yield return ("top-level array", Bytes("[1, 2, 3]"));
        yield return ("top-level string", Bytes("\"text\""));
        yield return ("deep nesting", Bytes(new string('[', 5000) + new string(']', 5000)));
        yield return ("huge line", Bytes($"{{\"text\": \"{string.Concat(Enumerable.Repeat("word ", 40_000))}\"}}"));
        // mixed formats in one file, in every order
        for (int i = 0; i < ValidLines.Length; i++)
            for (int j = 0; j < ValidLines.Length; j++)
                if (i != j) yield return ($"mixed {i} then {j}", Bytes(ValidLines[i] + "\n" + ValidLines[j]));
        // truncation of every valid line at every offset (a sample of offsets at the default size)
        foreach (var line in ValidLines)
            for (int cut = 1; cut < line.Length; cut += Math.Max(1, 6 / FuzzContract.Scale))
                yield return ($"truncated at {cut}: {Trunc(line)}", Bytes(ValidLines[0] + "\n" + line[..cut]));
        // random byte flips
        for (int k = 0; k < 40 * FuzzContract.Scale; k++)
        {
            var v = Encoding.UTF8.GetBytes(ValidLines[k % ValidLines.Length]);
            v[rng.Next(v.Length)] = (byte)rng.Next(256);
            yield return ($"byte flip {k}", [.. v, (byte)'\n']);
        }
    }

    static string Replace(string line, string field, string value)
    {
        var o = System.Text.Json.Nodes.JsonNode.Parse(line)!.AsObject();
        o.Remove(field);
        var rest = o.ToJsonString();
        return rest == "{}" ? $"{{\"{field}\": {value}}}" : $"{{\"{field}\": {value}, {rest[1..]}";
    }

    static string Remove(string line, string field)
    {
        var o = System.Text.Json.Nodes.JsonNode.Parse(line)!.AsObject();
        o.Remove(field);
        return o.ToJsonString();
    }

    static byte[] Bytes(string s) => Encoding.UTF8.GetBytes(s + "\n");

    static string Trunc(string s) => s.Length > 40 ? s[..40] + "…" : s;

    [Fact]
    public void JsonlLines()
    {
        var tok = Tokenizer.Load(Fixtures.Model("qwen2"));
        var dir = Fixtures.TempDir();
        int i = 0;
        All(JsonlCases().SelectMany(c =>
        {
            var path = Path.Combine(dir, $"case{i++}.jsonl");
            File.WriteAllBytes(path, c.content);
            return new (string, Action)[]
            {
                (c.name, () => JsonlDataset.Load(path, tok, new DataOptions { MaxLength = 64 }, JsonlDataset.ClassificationLabels(path))),
                (c.name + " (skip bad lines)", () => JsonlDataset.Load(path, tok, new DataOptions { MaxLength = 64, SkipBadLines = true }, JsonlDataset.ClassificationLabels(path))),
            };
        }), "train-jsonl");
    }

    // ---- configs ----

    static readonly string[] ConfigKeys = typeof(TrainConfig).GetProperties().Select(p => JsonNamingPolicy.SnakeCaseLower.ConvertName(p.Name))
        .Concat(["learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "lr_scheduler_type",
                 "max_steps", "bf16", "fp16", "task_type", "bias", "val_set_size", "metric_for_best_model", "dataset_text_field", "warmup_ratio", "lr_rate", "Model", ""])
        .ToArray();

    static readonly (string json, string yaml)[] ConfigValues =
    [
        ("\"abc\"", "abc"), ("\"\"", "''"), ("1.5", "1.5"), ("-1", "-1"), ("0", "0"), ("true", "true"), ("null", "null"), ("[1, 2]", "[1, 2]"),
        ("[]", "[]"), ("{\"a\": 1}", "{a: 1}"), ("1e400", "1e400"), ("99999999999999999999", "99999999999999999999"), ("\"NaN\"", ".nan"),
        ("[[1]]", "[[1]]"), ("\"all-linear\"", "all-linear"), ("\"" + new string('k', 5000) + "\"", new string('k', 5000)),
    ];

    static IEnumerable<(string name, string file, string text)> ConfigCases()
    {
        foreach (var key in ConfigKeys)
            foreach (var (json, yaml) in ConfigValues)
            {
                yield return ($"json {key}={Trunc(json)}", "c.json", $"{{\"model\": \"m\", \"data\": \"d\", \"{key}\": {json}}}");
                yield return ($"yaml {key}={Trunc(yaml)}", "c.yaml", $"model: m\ndata: d\n{(key.Length == 0 ? "''" : key)}: {yaml}\n");
            }
        string[] yamlOddities =
        [
            "a: &a [1]\nb: *a\n", "lr: &x 1\nr: *x\n", "<<: {lr: 1}\n", "lr:\n\t- 1\n", "\tlr: 1\n", "lr: 1\nlr: 2\n", "lr: 1\n---\nlr: 2\n",
            "- lr\n- r\n", "just a string\n", "", "~\n", "# only a comment\n", "lr: 1\n  r: 2\n", "lr: [1\n", "lr: '1\n", "? [a, b]\n: 1\n",
            "!!python/object:os.system x: 1\n", "lr: !!float 1\n", "target_modules: [q_proj, [v_proj]]\n", "target_modules:\n  - q_proj\n  - {a: 1}\n",
            new string(' ', 10) + "lr: 1\n", string.Concat(Enumerable.Repeat("[", 3000)) + string.Concat(Enumerable.Repeat("]", 3000)) + "\n",
            "a:\n" + string.Concat(Enumerable.Range(1, 200).Select(i => new string(' ', i) + "b:\n")), "lr: 1\r\nr: 2\r\n", "\uFEFFlr: 1\n",
            "lr: 0x10\n", "lr: 1_000\n", "lr: .inf\n", "steps: 1e3\n", "steps: 3000000000\n", "r: -0\n", "model: [a]\n", "seed: 1.0\n",
        ];
        foreach (var y in yamlOddities) yield return ($"yaml oddity {Trunc(y.Replace("\n", "\\n"))}", "c.yaml", y);
        string[] jsonOddities =
        [
            "", "{", "}", "[]", "null", "1", "\"x\"", "{\"lr\": 1} {\"lr\": 2}", "{\"lr\": 1,}", "{lr: 1}", "{\"lr\": 1 // c\n}", "{\"a\": {\"b\": {\"c\": {}}}}",
            new string('{', 2000), "{\"lr\": " + new string('[', 2000) + "}", "{\"lr\": 1, \"lr\": 1}", "\uFEFF{\"lr\": 1}", "{\"lr\": \"\\ud800\"}", "{\"\": 1}",
        ];
        foreach (var j in jsonOddities) yield return ($"json oddity {Trunc(j)}", "c.json", j);
        // truncation of a full config at every offset
        var full = "{\"model\": \"m\", \"data\": \"d\", \"learning_rate\": 0.001, \"target_modules\": [\"q_proj\", \"v_proj\"], \"max_steps\": 5, \"bf16\": true}";
        var fullYaml = "model: m\ndata: d\nlearning_rate: 0.001\ntarget_modules:\n  - q_proj\n  - v_proj\nmax_steps: 5\nbf16: true\n";
        for (int cut = 0; cut < full.Length; cut += Math.Max(1, 3 / FuzzContract.Scale)) yield return ($"json truncated at {cut}", "c.json", full[..cut]);
        for (int cut = 0; cut < fullYaml.Length; cut += Math.Max(1, 3 / FuzzContract.Scale)) yield return ($"yaml truncated at {cut}", "c.yaml", fullYaml[..cut]);
    }

    [Fact]
    public void TrainConfigs()
    {
        var dir = Fixtures.TempDir();
        int i = 0;
        All(ConfigCases().Select(c =>
        {
            var sub = Path.Combine(dir, $"{i++}");
            Directory.CreateDirectory(sub);
            var path = Path.Combine(sub, c.file);
            File.WriteAllText(path, c.text);
            return (c.name, (Action)(() => TrainConfig.Load(path).Validate()));
        }), "train-config");
        // invalid UTF-8 and binary content
        var bin = Path.Combine(dir, "bin.yaml");
        File.WriteAllBytes(bin, [0x6C, 0x72, 0x3A, 0x20, 0xFF, 0xFE, 0x0A]);
        var binJson = Path.Combine(dir, "bin.json");
        File.WriteAllBytes(binJson, [0x7B, 0x22, 0xFF, 0x22, 0x3A, 0x31, 0x7D]);
        All([("yaml invalid utf-8", () => TrainConfig.Load(bin)), ("json invalid utf-8", () => TrainConfig.Load(binJson)),
             ("config is a directory", () => TrainConfig.Load(dir)), ("config missing", () => TrainConfig.Load(Path.Combine(dir, "nope.yaml")))], "train-config");
    }

    // ---- output directory states ----

    [Fact]
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    public void OutputDirectoryStates()
    {
        var cases = new List<(string name, Action<string> arrange, bool resume, bool overwrite)>
        {
            ("foreign files everywhere", o => Foreign(o, "adapter/precious.txt", "best/notes.txt", "last/x.bin", "checkpoints/notes.md", "metrics.jsonl", "report.html"), false, false),
            ("foreign files everywhere, overwrite", o => Foreign(o, "adapter/precious.txt", "best/notes.txt", "last/x.bin", "checkpoints/step-000001/mine.txt", "metrics.jsonl"), false, true),
            ("foreign files in subfolders, overwrite", o => Foreign(o, "adapter/precious.txt", "best/notes.txt", "last/x.bin", "checkpoints/step-000001/mine.txt", "notes.md"), false, true),
            ("foreign file named like a checkpoint file, overwrite", o => Foreign(o, "checkpoints/step-000001/trainer_state.json"), false, true),
            ("debris only", o => Foreign(o, ".out.tmp-123/x", "checkpoints/.tmp-step-000001-1/optimizer.safetensors", "adapter/adapter_model.safetensors.tmp"), false, false),
            ("resume with nothing there", o => Foreign(o, "notes.md"), true, false),
            ("resume and overwrite", _ => { }, true, true),
            ("output is a file", o => { Directory.Delete(o); File.WriteAllText(o, "x"); }, false, false),
            ("corrupt manifest", o => Foreign(o, RunDirectory.ManifestFile + "=not json"), false, true),
            ("manifest naming files outside", o => Foreign(o, RunDirectory.ManifestFile + "={\"files\": [\"../outside.txt\", \"/etc/hostname\", \"../run/../outside.txt\"]}", "adapter/precious.txt"), false, true),
            ("manifest with wrong types", o => Foreign(o, RunDirectory.ManifestFile + "={\"files\": [1, null, {\"a\": 2}]}"), false, true),
            ("step directory without marker", o => Foreign(o, "checkpoints/step-000001/trainer_state.json=x", RunDirectory.ManifestFile + "={\"files\": []}"), true, false),
            ("read-only output", o => { Foreign(o, "notes.md"); File.SetUnixFileMode(o, UnixFileMode.UserRead | UnixFileMode.UserExecute); }, false, true),
        };
        var failures = new List<string>();
        foreach (var (name, arrange, resume, overwrite) in cases)
        {
            var root = Fixtures.TempDir();
            var output = Path.Combine(root, "run");
            Directory.CreateDirectory(output);
            File.WriteAllText(Path.Combine(root, "outside.txt"), "sibling");
            arrange(output);
            // Not the user's: the manifest (LoraKit's own), a half-written safetensors temporary, which the next write of
            // that file replaces, and a killed run's temporary checkpoint (.tmp-step-*), which is cleaned up: their names are LoraKit's.
            var foreign = FuzzContract.Snapshot(root).Where(kv => !kv.Key.EndsWith(RunDirectory.ManifestFile) && !kv.Key.EndsWith(".safetensors.tmp")
                                                                 && !kv.Key.Contains(".tmp-step-")).ToDictionary();
            var c = TrainingRunTests.Small(output);
            c.Steps = 1;
            try
            {
                FuzzContract.Check("train-output", name, () => Trainer.Run(c, resume, new ListLog(), overwrite), TimeSpan.FromSeconds(60));
                FuzzContract.AssertUntouched(foreign, root, name);
            }
            catch (Xunit.Sdk.XunitException e) { failures.Add(e.Message); }
            finally { if (Directory.Exists(output)) File.SetUnixFileMode(output, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute); }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    [Fact]
    public void CliCases()
    {
        // A few through the real CLI: one "error:" line on stderr and exit 1 (each process costs a second or two).
        var dir = Fixtures.TempDir();
        var laughs = Path.Combine(dir, "laughs.yaml");
        File.WriteAllText(laughs, "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n");
        var typo = Path.Combine(dir, "typo.json");
        File.WriteAllText(typo, "{\n  \"learning_rat\": 0.001\n}");
        var file = Path.Combine(dir, "a-file");
        File.WriteAllText(file, "x");
        var foreign = Path.Combine(dir, "foreign");
        Foreign(foreign, "adapter/precious.txt", "metrics.jsonl");
        var before = FuzzContract.Snapshot(foreign);
        string[] model = ["--model", Fixtures.Model("llama"), "--data", Fixtures.Path_("training", "data.jsonl"), "--device", "cpu", "--steps", "1"];
        var cases = new (string name, string[] args)[]
        {
            ("yaml billion laughs", ["train", "--config", laughs]),
            ("config key typo", ["train", "--config", typo]),
            ("output is a file", ["train", .. model, "--output", file]),
            ("resume with no run", ["train", "--output", Path.Combine(dir, "none"), "--resume"]),
            ("foreign output", ["train", .. model, "--output", foreign]),
            ("foreign output, overwrite", ["train", .. model, "--output", foreign, "--overwrite"]),
        };
        foreach (var (name, args) in cases)
        {
            var (code, _, stderr) = CliTests.RunCli(args);
            FuzzContract.CheckCli("train-cli", name, code, stderr);
            Assert.Equal(1, code);
        }
        FuzzContract.AssertUntouched(before, foreign, "CLI runs into a foreign directory");
    }

    /// <summary>Creates files (relative path, optionally "=content") under the output directory.</summary>
    static void Foreign(string output, params string[] files)
    {
        foreach (var f in files)
        {
            var (rel, content) = f.Contains('=') ? (f[..f.IndexOf('=')], f[(f.IndexOf('=') + 1)..]) : (f, "the user's " + f);
            var path = Path.Combine(output, rel);
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            File.WriteAllText(path, content);
        }
    }
}
