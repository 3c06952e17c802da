using System.Reflection;
using System.Reflection.Emit;

namespace LoraKit.Tests;

/// <summary>
/// The library's layering, checked on the compiled assemblies: every type's references — its base types, interfaces,
/// fields, signatures, locals and every type, method or field its IL names (lambdas and state machines included, as
/// nested types of the type that wrote them) — are grouped by the folder (namespace) on each side, and the folder graph
/// must follow the direction IO ← Models ← Lora ← Training/Serving/Classification/Generation ← Server ← CLI, without a
/// cycle. Reading IL rather than source catches what a grep of <c>using</c> lines misses (partly qualified names such as
/// <c>Models.Linear</c> inside <c>LoraKit.Lora</c>, fully qualified names, extension methods).
/// </summary>
public class ArchitectureTests
{
    /// <summary>
    /// Folders by layer: a folder may use its own layer's utilities only where <see cref="SiblingUses"/> allows it, and any
    /// lower layer. The root namespace (LoraKit: the exception base) is the bottom.
    /// </summary>
    static readonly string[][] Layers =
    [
        ["LoraKit"],
        ["IO", "Templating", "Hub"],
        ["Tokenization", "Runtime", "Runtime.Cuda", "Quantization"],
        ["Models", "Data"],
        ["Lora"],
        ["Accelerated", "Export", "Serving.Paged", "Distributed"],
        ["Generation", "Training", "Classification", "Serving"],
        ["Evaluation"],
        ["Registry"],
        ["Diagnostics"],
        ["Api"],
    ];

    /// <summary>
    /// The library's entry points: in the root namespace (so <c>using LoraKit;</c> finds them) but the top layer, since
    /// they tie model, tokenizer, adapters, generation and serving together. Every other root type is the bottom.
    /// </summary>
    static readonly string[] EntryPoints = ["LoraKitModel"];

    /// <summary>Uses between folders of one layer, each pointing one way (the cycle check keeps it so).</summary>
    static readonly (string from, string to)[] SiblingUses =
    [
        ("Training", "Generation"), ("Serving", "Generation"), ("Classification", "Training"),
    ];

    /// <summary>Models is a readable reference: it knows neither adapters nor the fast path.</summary>
    static readonly string[] ModelsMustNotUse = ["Lora", "Accelerated", "Runtime.Cuda"];

    static readonly Assembly Library = typeof(LoraKitException).Assembly;

    [Fact]
    public void FoldersDependOnlyOnLowerLayers()
    {
        var rank = new Dictionary<string, int>();
        for (int i = 0; i < Layers.Length; i++) foreach (var f in Layers[i]) rank[f] = i;
        var siblings = SiblingUses.ToHashSet();
        var edges = LayeringEdges();
        var unknown = edges.Keys.Select(e => e.from).Concat(edges.Keys.Select(e => e.to)).Distinct().Where(f => !rank.ContainsKey(f)).ToList();
        Assert.True(unknown.Count == 0, $"folders with no layer in {nameof(Layers)}: {string.Join(", ", unknown)} (place each one)");
        var upward = edges.Where(e => rank[e.Key.to] > rank[e.Key.from] || (rank[e.Key.to] == rank[e.Key.from] && !siblings.Contains(e.Key)))
            .Select(e => $"{e.Key.from} -> {e.Key.to} ({string.Join(", ", e.Value.Take(3))})").ToList();
        Assert.True(upward.Count == 0, "uses against the layering:\n" + string.Join("\n", upward));
    }

    [Fact]
    public void FolderGraphHasNoCycle()
    {
        var edges = LayeringEdges().Keys.ToList();
        var next = edges.GroupBy(e => e.from).ToDictionary(g => g.Key, g => g.Select(e => e.to).ToList());
        var state = new Dictionary<string, int>(); // 1: on the path, 2: done
        var path = new List<string>();
        List<string>? cycle = null;
        void Visit(string f)
        {
            if (cycle != null || state.GetValueOrDefault(f) == 2) return;
            if (state.GetValueOrDefault(f) == 1) { cycle = [.. path.Skip(path.IndexOf(f)), f]; return; }
            state[f] = 1;
            path.Add(f);
            foreach (var t in next.GetValueOrDefault(f, [])) Visit(t);
            path.RemoveAt(path.Count - 1);
            state[f] = 2;
        }
        foreach (var f in next.Keys) Visit(f);
        Assert.True(cycle is null, $"a cycle between folders: {string.Join(" -> ", cycle ?? [])}");
    }

    [Fact]
    public void ModelsUsesNeitherLoraNorTheFastPath()
    {
        var offenders = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var type in TopLevelTypes(Library).Where(t => Folder(t) == "Models"))
            foreach (var used in UsedTypes(type).Select(Folder).Distinct())
                if (ModelsMustNotUse.Contains(used)) offenders.Add($"{type.FullName} -> {used}");
        Assert.True(offenders.Count == 0, "uses of Lora/Accelerated/Runtime.Cuda in Models:\n" + string.Join("\n", offenders));
    }

    [Fact]
    public void ServerAndCliSitOnTop()
    {
        var server = typeof(LoraKit.Server.OpenAiServer).Assembly;
        var cli = typeof(LoraKit.Cli.Program).Assembly;
        Assert.DoesNotContain(server.GetReferencedAssemblies(), a => a.Name == cli.GetName().Name);
        Assert.DoesNotContain(Library.GetReferencedAssemblies(), a => a.Name == server.GetName().Name || a.Name == cli.GetName().Name);
        // The CLI is a shell: no ASP.NET Core of its own (hosting is LoraKit.Server's), and no LoraKit code outside its commands.
        Assert.All(TopLevelTypes(cli), t => Assert.StartsWith("LoraKit.Cli", t.Namespace ?? "", StringComparison.Ordinal));
        Assert.Empty(cli.GetTypes().SelectMany(UsedTypes).Where(t => t.Namespace?.StartsWith("Microsoft.AspNetCore", StringComparison.Ordinal) == true).Distinct());
    }

    /// <summary>
    /// The library's folder uses, less Models' uses of <see cref="ModelsMustNotUse"/> (those have their own test with its
    /// known offenders, so this test and the cycle test hold already while the offenders are being removed).
    /// </summary>
    static Dictionary<(string from, string to), List<string>> LayeringEdges() =>
        FolderEdges(Library).Where(e => !(e.Key.from == "Models" && ModelsMustNotUse.Contains(e.Key.to))).ToDictionary();

    /// <summary>Folder → folder uses in <paramref name="asm"/>, each with the types that make it.</summary>
    static Dictionary<(string from, string to), List<string>> FolderEdges(Assembly asm)
    {
        var edges = new Dictionary<(string, string), List<string>>();
        foreach (var type in TopLevelTypes(asm))
        {
            string from = Folder(type);
            foreach (var used in UsedTypes(type).Where(t => t.Assembly == asm && t.Namespace?.StartsWith("LoraKit", StringComparison.Ordinal) == true).Select(Folder).Distinct())
            {
                if (used == from) continue;
                if (!edges.TryGetValue((from, used), out var list)) edges[(from, used)] = list = [];
                list.Add(type.Name);
            }
        }
        return edges;
    }

    static IEnumerable<Type> TopLevelTypes(Assembly asm) =>
        asm.GetTypes().Where(t => !t.IsNested && t.Namespace is not null && !t.Name.StartsWith('<') && t.Namespace.StartsWith("LoraKit", StringComparison.Ordinal));

    /// <summary>"Models", "Runtime.Cuda", "LoraKit" (the root) for a type in LoraKit; its namespace for any other.</summary>
    static string Folder(Type t)
    {
        while (t.IsNested) t = t.DeclaringType!;
        var ns = t.Namespace ?? "";
        if (ns == "LoraKit" && EntryPoints.Contains(t.Name)) return "Api";
        return ns == "LoraKit" ? "LoraKit" : ns.StartsWith("LoraKit.", StringComparison.Ordinal) ? ns["LoraKit.".Length..] : ns;
    }

    const BindingFlags All = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;

    /// <summary>Every LoraKit type a type (with its nested types) names anywhere, generic arguments unpacked.</summary>
    static HashSet<Type> UsedTypes(Type type)
    {
        var found = new HashSet<Type>();
        void Add(Type? t)
        {
            if (t is null || t.IsGenericParameter) return;
            if (t.HasElementType) { Add(t.GetElementType()); return; }
            if (t.IsGenericType && !t.IsGenericTypeDefinition)
            {
                foreach (var a in t.GetGenericArguments()) Add(a);
                t = t.GetGenericTypeDefinition();
            }
            found.Add(t);
        }
        foreach (var t in Nested(type))
        {
            Add(t.BaseType);
            foreach (var i in t.GetInterfaces()) Add(i);
            foreach (var f in t.GetFields(All)) Add(f.FieldType);
            foreach (var p in t.GetProperties(All)) Add(p.PropertyType);
            foreach (var m in t.GetMethods(All).Cast<MethodBase>().Concat(t.GetConstructors(All)))
            {
                if (m is MethodInfo mi) Add(mi.ReturnType);
                foreach (var p in m.GetParameters()) Add(p.ParameterType);
                var body = m.GetMethodBody();
                if (body is null) continue;
                foreach (var l in body.LocalVariables) Add(l.LocalType);
                foreach (var used in IlReferences(m, body.GetILAsByteArray() ?? [])) Add(used);
            }
        }
        return found;
    }

    static IEnumerable<Type> Nested(Type t) => t.GetNestedTypes(All).SelectMany(Nested).Prepend(t);

    static readonly Dictionary<short, OpCode> OpCodesByValue = typeof(OpCodes).GetFields(BindingFlags.Public | BindingFlags.Static)
        .Select(f => (OpCode)f.GetValue(null)!).ToDictionary(o => o.Value);

    /// <summary>The declaring types (and types) of the members and types <paramref name="m"/>'s IL refers to by token.</summary>
    static IEnumerable<Type> IlReferences(MethodBase m, byte[] il)
    {
        var module = m.Module;
        Type[]? typeArgs = m.DeclaringType is { IsGenericType: true } d ? d.GetGenericArguments() : null;
        Type[]? methodArgs = m.IsGenericMethod ? m.GetGenericArguments() : null;
        for (int i = 0; i < il.Length;)
        {
            short value = il[i] == 0xFE ? (short)(0xFE00 | il[i + 1]) : il[i];
            i += il[i] == 0xFE ? 2 : 1;
            if (!OpCodesByValue.TryGetValue(value, out var op)) yield break; // not IL we can read: stop rather than guess
            int size = op.OperandType switch
            {
                OperandType.InlineNone => 0,
                OperandType.ShortInlineBrTarget or OperandType.ShortInlineI or OperandType.ShortInlineVar => 1,
                OperandType.InlineVar => 2,
                OperandType.InlineI8 or OperandType.InlineR => 8,
                OperandType.InlineSwitch => 4 + 4 * BitConverter.ToInt32(il, i),
                _ => 4,
            };
            if (op.OperandType is OperandType.InlineMethod or OperandType.InlineField or OperandType.InlineType or OperandType.InlineTok)
            {
                MemberInfo? member = null;
                try { member = module.ResolveMember(BitConverter.ToInt32(il, i), typeArgs, methodArgs); }
                catch (ArgumentException) { } // a token into a generic context this scan does not model
                if (member is MethodInfo { IsGenericMethod: true } mi) foreach (var a in mi.GetGenericArguments()) yield return a;
                if ((member as Type ?? member?.DeclaringType) is Type t) yield return t;
            }
            i += size;
        }
    }
}
