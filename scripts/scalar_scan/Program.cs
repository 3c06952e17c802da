// Finds TorchSharp Scalars (and Tensors) created implicitly at a call site, from the compiled IL and its PDB.
//
// Why: TorchSharp 0.107's implicit conversions (x + 1e-6, x * 0.5, pow(2), masked_fill(m, -inf)) and the hidden
// Scalars inside some TorchSharp methods (add(Tensor)'s alpha 1, arange's step, vector_norm's ord) are reachable by
// nothing once their handle is read, so the finalizer can free them while libtorch reads them (see
// src/LoraKit/ScalarOps.cs). Usage (scripts/check_implicit_scalars.sh runs it):
//   scalar_scan <TorchSharp.dll> --list                  TorchSharp methods that make a Scalar they do not keep alive
//   scalar_scan <TorchSharp.dll> <a.dll> [<b.dll> ...]    file:line and callee of every such call in the assemblies
//   scalar_scan --public <a.dll>                          the number of public types
using System.Collections.Immutable;
using System.Reflection;
using System.Reflection.Emit;
using System.Reflection.Metadata;
using System.Reflection.Metadata.Ecma335;
using System.Reflection.PortableExecutable;

var opcodes = typeof(OpCodes).GetFields(BindingFlags.Public | BindingFlags.Static).Select(f => (OpCode)f.GetValue(null)).ToDictionary(o => (ushort)o.Value);

if (args[0] == "--public")
{
    using var pe0 = new PEReader(File.OpenRead(args[1]));
    var md0 = pe0.GetMetadataReader();
    bool Visible(TypeDefinitionHandle h)
    {
        var t = md0.GetTypeDefinition(h);
        var v = t.Attributes & TypeAttributes.VisibilityMask;
        if (v == TypeAttributes.Public) return true;
        return v == TypeAttributes.NestedPublic && Visible(t.GetDeclaringType());
    }
    var pub = md0.TypeDefinitions.Where(Visible).ToList();
    Console.WriteLine($"public types: {pub.Count} (top-level {pub.Count(h => md0.GetTypeDefinition(h).GetDeclaringType().IsNil)})");
    return;
}
string torchPath = args[0];
var hidden = new Dictionary<string, string>(); // method key -> reason
// pass 1: TorchSharp methods that create Scalars via op_Implicit/ToScalar (and don't dispose)
var tsCalls = new Dictionary<string, List<string>>();
using (var pe = new PEReader(File.OpenRead(torchPath)))
{
    var md = pe.GetMetadataReader();
    foreach (var th in md.TypeDefinitions)
    {
        var td = md.GetTypeDefinition(th);
        foreach (var mh in td.GetMethods())
        {
            var m = md.GetMethodDefinition(mh);
            if (m.RelativeVirtualAddress == 0) continue;
            string key = Key(md, mh);
            var callees = Calls(md, pe.GetMethodBody(m.RelativeVirtualAddress)).Select(c => c.callee).ToList();
            tsCalls[key] = callees;
            bool creates = callees.Any(c => c.StartsWith("TorchSharp.Scalar::op_Implicit") || c.StartsWith("TorchSharp.ScalarExtensionMethods::ToScalar"));
            bool disposes = callees.Any(c => c.StartsWith("TorchSharp.Scalar::Dispose") || c.StartsWith("System.IDisposable::Dispose"));
            if (creates && !disposes && !key.StartsWith("TorchSharp.Scalar::op_Implicit") && !key.StartsWith("TorchSharp.ScalarExtensionMethods")) hidden[key] = "creates";
        }
    }
}
// transitive closure (one assembly)
bool changed = true;
while (changed)
{
    changed = false;
    foreach (var (k, cs) in tsCalls)
        if (!hidden.ContainsKey(k) && cs.FirstOrDefault(hidden.ContainsKey) is { } via) { hidden[k] = "via " + via; changed = true; }
}
if (args.Length > 1 && args[1] == "--list") { foreach (var (k, v) in hidden.OrderBy(p => p.Key)) Console.WriteLine($"{k}  [{v}]"); return; }

foreach (var asmPath in args.Skip(1))
{
    using var pe = new PEReader(File.OpenRead(asmPath));
    var md = pe.GetMetadataReader();
    using var pdbProvider = MetadataReaderProvider.FromPortablePdbStream(File.OpenRead(Path.ChangeExtension(asmPath, ".pdb")));
    var pdb = pdbProvider.GetMetadataReader();
    foreach (var mh in md.MethodDefinitions)
    {
        var m = md.GetMethodDefinition(mh);
        if (m.RelativeVirtualAddress == 0) continue;
        var sps = pdb.GetMethodDebugInformation(mh.ToDebugInformationHandle()).GetSequencePoints().Where(s => !s.IsHidden).ToList();
        foreach (var (offset, callee) in Calls(md, pe.GetMethodBody(m.RelativeVirtualAddress)))
        {
            string why = callee.StartsWith("TorchSharp.Scalar::op_Implicit") || callee.StartsWith("TorchSharp.torch/Tensor::op_Implicit") ? "implicit" : hidden.TryGetValue(callee, out var r) ? "hidden Scalar in " + callee : null;
            if (why == null) continue;
            var sp = sps.LastOrDefault(s => s.Offset <= offset);
            string file = sp.Document.IsNil ? "?" : pdb.GetString(pdb.GetDocument(sp.Document).Name);
            Console.WriteLine($"{file}:{sp.StartLine}\t{(callee.Contains("::op_Implicit") ? callee : callee.Split('(')[0])}");
        }
    }
}

IEnumerable<(int offset, string callee)> Calls(MetadataReader md, MethodBodyBlock body)
{
    var il = body.GetILReader();
    while (il.RemainingBytes > 0)
    {
        int off = il.Offset;
        ushort v = il.ReadByte();
        if (v == 0xFE) v = (ushort)(0xFE00 | il.ReadByte());
        var op = opcodes[v];
        switch (op.OperandType)
        {
            case OperandType.InlineNone: break;
            case OperandType.ShortInlineBrTarget: case OperandType.ShortInlineI: case OperandType.ShortInlineVar: il.ReadByte(); break;
            case OperandType.InlineVar: il.ReadUInt16(); break;
            case OperandType.InlineI8: case OperandType.InlineR: il.ReadInt64(); break;
            case OperandType.InlineSwitch: int n = il.ReadInt32(); for (int i = 0; i < n; i++) il.ReadInt32(); break;
            case OperandType.InlineMethod:
                int tok = il.ReadInt32();
                if (op == OpCodes.Call || op == OpCodes.Callvirt || op == OpCodes.Newobj)
                    yield return (off, Key(md, MetadataTokens.EntityHandle(tok)));
                break;
            default: il.ReadInt32(); break;
        }
    }
}

static string Key(MetadataReader md, EntityHandle h)
{
    var p = new Sig(md);
    switch (h.Kind)
    {
        case HandleKind.MethodDefinition:
            var d = md.GetMethodDefinition((MethodDefinitionHandle)h);
            return TypeName(md, d.GetDeclaringType()) + "::" + md.GetString(d.Name) + SigStr(d.DecodeSignature(p, null));
        case HandleKind.MemberReference:
            var r = md.GetMemberReference((MemberReferenceHandle)h);
            if (r.GetKind() != MemberReferenceKind.Method) return "field";
            string parent = r.Parent.Kind switch
            {
                HandleKind.TypeReference => p.GetTypeFromReference(md, (TypeReferenceHandle)r.Parent, 0),
                HandleKind.TypeDefinition => TypeName(md, (TypeDefinitionHandle)r.Parent),
                HandleKind.TypeSpecification => md.GetTypeSpecification((TypeSpecificationHandle)r.Parent).DecodeSignature(p, null),
                _ => "?"
            };
            return parent + "::" + md.GetString(r.Name) + SigStr(r.DecodeMethodSignature(p, null));
        case HandleKind.MethodSpecification:
            return Key(md, md.GetMethodSpecification((MethodSpecificationHandle)h).Method);
    }
    return "?";
}
static string SigStr(MethodSignature<string> s) => "(" + string.Join(",", s.ParameterTypes) + ")";
static string TypeName(MetadataReader md, TypeDefinitionHandle h)
{
    var t = md.GetTypeDefinition(h);
    var decl = t.GetDeclaringType();
    string ns = md.GetString(t.Namespace);
    return decl.IsNil ? (ns.Length > 0 ? ns + "." : "") + md.GetString(t.Name) : TypeName(md, decl) + "/" + md.GetString(t.Name);
}

class Sig(MetadataReader md) : ISignatureTypeProvider<string, object>
{
    public string GetArrayType(string e, ArrayShape s) => e + "[,]";
    public string GetByReferenceType(string e) => e + "&";
    public string GetFunctionPointerType(MethodSignature<string> s) => "fnptr";
    public string GetGenericInstantiation(string g, ImmutableArray<string> a) => g + "<" + string.Join(",", a) + ">";
    public string GetGenericMethodParameter(object c, int i) => "!!" + i;
    public string GetGenericTypeParameter(object c, int i) => "!" + i;
    public string GetModifiedType(string m, string u, bool r) => u;
    public string GetPinnedType(string e) => e;
    public string GetPointerType(string e) => e + "*";
    public string GetPrimitiveType(PrimitiveTypeCode t) => t.ToString();
    public string GetSZArrayType(string e) => e + "[]";
    public string GetTypeFromDefinition(MetadataReader r, TypeDefinitionHandle h, byte k)
    {
        var t = r.GetTypeDefinition(h); var decl = t.GetDeclaringType(); string ns = r.GetString(t.Namespace);
        return decl.IsNil ? (ns.Length > 0 ? ns + "." : "") + r.GetString(t.Name) : GetTypeFromDefinition(r, decl, k) + "/" + r.GetString(t.Name);
    }
    public string GetTypeFromReference(MetadataReader r, TypeReferenceHandle h, byte k)
    {
        var t = r.GetTypeReference(h); string ns = r.GetString(t.Namespace);
        if (t.ResolutionScope.Kind == HandleKind.TypeReference) return GetTypeFromReference(r, (TypeReferenceHandle)t.ResolutionScope, k) + "/" + r.GetString(t.Name);
        return (ns.Length > 0 ? ns + "." : "") + r.GetString(t.Name);
    }
    public string GetTypeFromSpecification(MetadataReader r, object c, TypeSpecificationHandle h, byte k) => r.GetTypeSpecification(h).DecodeSignature(this, c);
}
