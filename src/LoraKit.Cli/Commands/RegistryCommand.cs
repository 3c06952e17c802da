using System.CommandLine;
using System.Text.Json.Nodes;
using LoraKit.Registry;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit registry add|list|show|diff|promote|rollback|export|delete|gc</c>: a shell over <see cref="AdapterStore"/>. Every
/// subcommand takes <c>--registry PATH</c> (default <c>LORAKIT_REGISTRY</c>, else <c>~/.lorakit/registry/</c>) and
/// <c>--json</c>; errors are one line on stderr and exit code 1.
/// </summary>
public static class RegistryCommand
{
    public static Command Build()
    {
        var cmd = new Command("registry", "Versioned adapters: add, list, show, diff, promote and roll back aliases, export, delete, gc.");
        cmd.Subcommands.Add(Add());
        cmd.Subcommands.Add(List());
        cmd.Subcommands.Add(Show());
        cmd.Subcommands.Add(Diff());
        cmd.Subcommands.Add(Promote());
        cmd.Subcommands.Add(Rollback());
        cmd.Subcommands.Add(Export());
        cmd.Subcommands.Add(Delete());
        cmd.Subcommands.Add(Gc());
        return cmd;
    }

    /// <summary>A subcommand with --registry and --json; <paramref name="body"/> gets the open store and whether to print JSON.</summary>
    static Command Sub(string name, string description, Symbol[] symbols, Func<ParseResult, AdapterStore, bool, int> body)
    {
        var registry = new Option<string?>("--registry") { Description = $"registry folder (default: ${AdapterStore.EnvVar}, else ~/.lorakit/registry)" };
        var json = new Option<bool>("--json") { Description = "print JSON" };
        var cmd = new Command(name, description) { registry, json };
        foreach (var s in symbols)
            if (s is Option o) cmd.Options.Add(o); else cmd.Arguments.Add((Argument)s);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            using var store = AdapterStore.Open(r.GetValue(registry));
            return body(r, store, r.GetValue(json));
        }));
        return cmd;
    }

    static Command Add()
    {
        var name = new Argument<string>("NAME") { Description = "adapter name (A-Z a-z 0-9 . _ -, up to 100)" };
        var dir = new Argument<string>("ADAPTER_DIR") { Description = "PEFT adapter directory" };
        var note = new Option<string?>("--note") { Description = "a note stored with the version" };
        var eval = new Option<string?>("--eval") { Description = "eval.json from `lorakit eval --output` to attach (its gate verdict for this adapter is recorded)" };
        var run = new Option<string?>("--run") { Description = "the `lorakit train` output directory that trained the adapter: its config, data hashes, metrics, wall time and parent are recorded as lineage" };
        return Sub("add", "Store an adapter as the next version of NAME (identical content returns the existing version).", [name, dir, note, eval, run], (r, store, json) =>
        {
            var v = store.Add(r.GetValue(name)!, r.GetValue(dir)!, r.GetValue(note), r.GetValue(eval), r.GetValue(run));
            PrintAdded(store, v, json);
            return 0;
        });
    }

    /// <summary>What <c>registry add</c> and <c>train --register</c> print: the version, its sha256, gate verdicts and parent.</summary>
    public static void PrintAdded(AdapterStore store, AdapterVersion v, bool json)
    {
        var evals = store.Evals(v.Name, v.Version);
        var lineage = store.LineageOf(v.Ref);
        if (json)
        {
            Console.WriteLine(CliJson.Serialize(new
            {
                name = v.Name, version = v.Version, sha256 = v.Sha256, gate_passed = evals.Any(e => e.GatePassed),
                run_dir = lineage?.RunDir, parent = lineage?.ParentRef,
            }));
            return;
        }
        Console.WriteLine($"{v.Ref} sha256 {v.Sha256}");
        foreach (var e in evals) Console.WriteLine($"  eval {e.Blob[..12]}: {(e.GatePassed ? "gate passed" : "no passed gate: " + e.Detail)}");
        if (lineage is not null) Console.WriteLine($"  run {lineage.RunDir} ({lineage.AdapterInRun}){ParentText(lineage)}");
    }

    static string ParentText(Lineage l) =>
        l.ParentRef is { } p ? $", parent {p}" : l.InitAdapterSha256 is { } s ? $", started from sha256 {s[..12]}{(l.InitAdapterRef is { } rf ? $" ({rf})" : "")}, not in this registry" : "";

    static Command List()
    {
        var name = new Argument<string?>("NAME") { Description = "only this name", Arity = ArgumentArity.ZeroOrOne };
        return Sub("list", "List registered adapter versions.", [name], (r, store, json) =>
        {
            var versions = store.List(r.GetValue(name));
            if (json) { Console.WriteLine(CliJson.Serialize(versions.Select(ToJson))); return 0; }
            foreach (var v in versions) Console.WriteLine($"{v.Ref,-30} {v.Sha256[..12]}  {v.Created}  {v.Note}");
            if (versions.Count == 0) Console.WriteLine($"(no adapters in {store.Root})");
            return 0;
        });
    }

    static Command Show()
    {
        var reference = new Argument<string>("NAME[@VERSION|@ALIAS]");
        return Sub("show", "Show a name's versions, aliases, alias history and evaluations.", [reference], (r, store, json) =>
        {
            var d = store.Show(r.GetValue(reference)!);
            if (json)
            {
                Console.WriteLine(CliJson.Serialize(new
                {
                    name = d.Name, versions = d.Versions.Select(ToJson), aliases = d.Aliases,
                    history = d.History.Select(h => new { alias = h.Alias, version = h.Version, previous = h.Previous, action = h.Action, no_gate = h.NoGate, at = h.At }),
                    evals = d.Evals.Select(e => new { version = e.Version, blob = e.Blob, base_fingerprint = e.BaseFingerprint, gate_passed = e.GatePassed, detail = e.Detail, added = e.Added }),
                    lineage = d.Lineage.ToDictionary(l => l.Version.ToString(System.Globalization.CultureInfo.InvariantCulture), l => l.ToJson()),
                }));
                return 0;
            }
            Console.WriteLine($"{d.Name}: {d.Versions.Count} version(s)");
            foreach (var v in d.Versions)
                Console.WriteLine($"  v{v.Version}  {v.Sha256[..12]}  {v.Created}  base {(v.BaseFingerprint is { } fp ? Models.BaseFingerprint.Short(fp) : "(not recorded)")}" +
                                  $"{(v.BaseModel is { } bm ? $" {bm}" : "")}{(v.Note is { } n ? $"  \"{n}\"" : "")}");
            foreach (var (alias, version) in d.Aliases) Console.WriteLine($"  @{alias} -> v{version}");
            foreach (var h in d.History) Console.WriteLine($"  {h.At}  {h.Action} @{h.Alias}: {(h.Previous is { } p ? $"v{p}" : "(new)")} -> v{h.Version}{(h.NoGate ? " (no gate)" : "")}");
            foreach (var e in d.Evals) Console.WriteLine($"  eval v{e.Version} {e.Blob[..12]}: {(e.GatePassed ? "gate passed" : e.Detail)}");
            foreach (var l in d.Lineage) PrintLineage(l);
            return 0;
        });
    }

    /// <summary>A version's lineage for people: the run, its key settings, data files, metrics and parent.</summary>
    static void PrintLineage(Lineage l)
    {
        string Val(JsonNode? n) => n is null ? "-" : n is JsonValue v && v.TryGetValue<string>(out var s) ? s : n.ToJsonString();
        var c = l.RunConfig;
        Console.WriteLine($"  lineage v{l.Version}: run {l.RunDir} ({l.AdapterInRun}){(l.WallSeconds is double w ? $", {w:F1} s" : "")}{ParentText(l)}");
        Console.WriteLine($"    config: method {Val(c["method"])}, r {Val(c["r"])}, lora_alpha {Val(c["lora_alpha"])}, lr {Val(c["lr"])}, schedule {Val(c["schedule"])}, " +
                          $"batch {Val(c["batch_size"])}x{Val(c["grad_accum"])}, steps {Val(l.Metrics["steps"])}, seed {Val(c["seed"])}");
        foreach (var (role, node) in l.Data)
            if (node is JsonObject d)
                Console.WriteLine($"    {role} data: {Val(d["path"])} sha256 {(d["sha256"] is JsonValue hv && hv.TryGetValue<string>(out var h) ? h[..12] : "(not recorded)")}, {Val(d["bytes"])} bytes, {Val(d["samples"])} samples");
        string Metrics(JsonNode? n) => n is JsonObject o && o.Count > 0 ? string.Join(", ", o.Select(kv => $"{kv.Key} {Val(kv.Value)}")) : "-";
        Console.WriteLine($"    final: {Metrics(l.Metrics["final"])}");
        if (l.Metrics["best"] is JsonObject) Console.WriteLine($"    best (step {Val(l.Metrics["best_step"])}): {Metrics(l.Metrics["best"])}");
    }

    static Command Diff()
    {
        var left = new Argument<string>("NAME@A") { Description = "a version (NAME@VERSION, NAME@ALIAS or NAME)" };
        var right = new Argument<string>("NAME@B") { Description = "the version to compare it with (the same name or another)" };
        return Sub("diff", "Show what differs between two versions: adapter and run config, data, metrics, parent and evaluations.", [left, right], (r, store, json) =>
        {
            var d = store.Diff(r.GetValue(left)!, r.GetValue(right)!);
            if (json) { Console.WriteLine(CliJson.Serialize(d.ToJson())); return 0; }
            static string Cell(string? s, int width) => s is null ? "-" : s.Length <= width ? s : s[..(width - 1)] + "…";
            int keyWidth = Math.Min(40, d.Rows.Max(x => x.Key.Length));
            Console.WriteLine($"{"",-16}{"".PadRight(keyWidth + 2)}{Cell(d.Left.Ref, 40),-42}{Cell(d.Right.Ref, 40)}");
            foreach (var section in VersionDiff.Sections)
            {
                var rows = d.Rows.Where(x => x.Section == section).ToList();
                foreach (var (row, i) in rows.Select((x, i) => (x, i)))
                    Console.WriteLine($"{(i == 0 ? section : ""),-16}{Cell(row.Key, keyWidth).PadRight(keyWidth + 2)}{Cell(row.Left, 40),-42}{Cell(row.Right, 40)}");
            }
            if (!d.Differs) Console.WriteLine("(no differences beyond the identity lines)");
            return 0;
        });
    }

    static Command Promote()
    {
        var reference = new Argument<string>("NAME@VERSION");
        var alias = new Option<string>("--alias") { Description = "alias to point at the version (e.g. production)", Required = true };
        var noGate = new Option<bool>("--no-gate") { Description = "promote without a passed gate (warned, and recorded in the alias history)" };
        var baseFp = new Option<string?>("--base-fingerprint") { Description = "the base the passed gate must be on (default: the base the adapter records)" };
        return Sub("promote", "Point an alias at a version; requires a passed gate attached to it (or --no-gate).", [reference, alias, noGate, baseFp], (r, store, json) =>
        {
            bool skip = r.GetValue(noGate);
            var move = store.Promote(r.GetValue(reference)!, r.GetValue(alias)!, skip, r.GetValue(baseFp));
            if (skip) Console.Error.WriteLine($"warning: promoted WITHOUT an evaluation gate (--no-gate); recorded in the alias history");
            PrintMove(r.GetValue(reference)!, move, json);
            return 0;
        });
    }

    static Command Rollback()
    {
        var name = new Argument<string>("NAME");
        var alias = new Option<string>("--alias") { Description = "alias to return to its previous version", Required = true };
        return Sub("rollback", "Return an alias to the version it pointed to before its last move.", [name, alias], (r, store, json) =>
        {
            PrintMove(r.GetValue(name)!, store.Rollback(r.GetValue(name)!, r.GetValue(alias)!), json);
            return 0;
        });
    }

    static Command Export()
    {
        var reference = new Argument<string>("NAME[@VERSION|@ALIAS]");
        var dir = new Argument<string>("DIR") { Description = "output folder (must not exist or be empty)" };
        return Sub("export", "Write a version as a plain PEFT adapter folder (every file checked against its hash).", [reference, dir], (r, store, json) =>
        {
            var v = store.Export(r.GetValue(reference)!, r.GetValue(dir)!);
            string outDir = Path.GetFullPath(r.GetValue(dir)!);
            Console.WriteLine(json ? CliJson.Serialize(new { name = v.Name, version = v.Version, sha256 = v.Sha256, dir = outDir }) : $"{v.Ref} -> {outDir}");
            return 0;
        });
    }

    static Command Delete()
    {
        var reference = new Argument<string>("NAME@VERSION");
        return Sub("delete", "Delete a version (refused while an alias points to it); `gc` frees its files.", [reference], (r, store, json) =>
        {
            store.Delete(r.GetValue(reference)!);
            Console.WriteLine(json ? CliJson.Serialize(new { deleted = r.GetValue(reference) }) : $"deleted {r.GetValue(reference)}");
            return 0;
        });
    }

    static Command Gc() => Sub("gc", "Remove stored files no version or evaluation refers to.", [], (r, store, json) =>
    {
        var (blobs, bytes) = store.Gc();
        Console.WriteLine(json ? CliJson.Serialize(new { blobs, bytes }) : $"removed {blobs} blob(s), {bytes:N0} bytes");
        return 0;
    });

    static void PrintMove(string name, AliasMove m, bool json)
    {
        string n = RegistryRef.Parse(name).Name;
        Console.WriteLine(json
            ? CliJson.Serialize(new { name = n, alias = m.Alias, version = m.Version, previous = m.Previous, action = m.Action, no_gate = m.NoGate })
            : $"{n}@{m.Alias} -> v{m.Version}{(m.Previous is { } p ? $" (was v{p})" : "")}");
    }

    static object ToJson(AdapterVersion v) => new
    {
        name = v.Name, version = v.Version, sha256 = v.Sha256, created = v.Created, note = v.Note,
        base_fingerprint = v.BaseFingerprint, base_model_type = v.BaseModelType, base_model = v.BaseModel,
        files = v.Files.Select(f => new { file = f.File, blob = f.Blob, size = f.Size }),
    };
}
