using System.Text;

namespace LoraKit.Templating;

/// <summary>
/// Evaluates a parsed template. Scoping follows Jinja: <c>for</c> bodies and macros get their own scope (so a
/// <c>set</c> inside a loop does not leak out), <c>if</c> does not; <c>namespace()</c> objects carry state across.
/// </summary>
internal sealed class Interpreter
{
    readonly List<Dictionary<string, object?>> _scopes = [];

    sealed class LoopSignal(bool isBreak, int line) : Exception
    {
        public bool IsBreak { get; } = isBreak;
        public int Line { get; } = line;
    }

    public Interpreter(Dictionary<string, object?> globals)
    {
        _scopes.Add(Builtins.Globals());
        _scopes.Add(new Dictionary<string, object?>(globals));
    }

    public string Render(List<Node> nodes)
    {
        using var budget = RenderLimits.Begin();
        var sb = new StringBuilder();
        try { Exec(nodes, sb); }
        catch (LoopSignal s) { throw new TemplateException($"'{(s.IsBreak ? "break" : "continue")}' outside a for loop", s.Line); }
        catch (InsufficientExecutionStackException) { throw new TemplateException("template nests or recurses too deeply for the stack"); }
        return sb.ToString();
    }

    static void Append(StringBuilder sb, string text, int line)
    {
        RenderLimits.CheckChars((long)sb.Length + text.Length, line, "the rendered text");
        RenderLimits.Charge(text.Length / 16, line);
        sb.Append(text);
    }

    object? Lookup(string name)
    {
        for (int i = _scopes.Count - 1; i >= 0; i--)
            if (_scopes[i].TryGetValue(name, out var v)) return v;
        return Undefined.Instance;
    }

    void Exec(List<Node> nodes, StringBuilder sb)
    {
        foreach (var n in nodes) Exec(n, sb);
    }

    void Exec(Node node, StringBuilder sb)
    {
        using var depth = RenderLimits.Enter(node.Line);
        switch (node)
        {
            case TextNode t: Append(sb, t.Text, t.Line); break;
            case OutputNode o: Append(sb, PyValues.Str(Eval(o.Value)), o.Line); break;
            case IfNode i:
                foreach (var (cond, body) in i.Branches)
                    if (PyValues.Truthy(Eval(cond))) { Exec(body, sb); return; }
                if (i.Else != null) Exec(i.Else, sb);
                break;
            case ForNode f: ExecFor(f, sb); break;
            case SetNode s:
                var value = s.Value != null ? Eval(s.Value) : RenderBlock(s.Block!);
                if (s.Attr != null)
                {
                    if (Lookup(s.Name) is not Namespace ns)
                        throw new TemplateException($"cannot assign attribute '{s.Attr}' on '{s.Name}': only namespace() objects are mutable", s.Line);
                    ns[s.Attr] = value;
                }
                else _scopes[^1][s.Name] = value;
                break;
            case MacroNode m: _scopes[^1][m.Name] = MakeMacro(m); break;
            case CallBlockNode c:
            {
                var caller = (Callable)((_, _) => RenderBlock(c.Body));
                _scopes.Add(new() { ["caller"] = caller });
                try { Append(sb, PyValues.Str(Eval(c.Call)), c.Line); }
                finally { _scopes.RemoveAt(_scopes.Count - 1); }
                break;
            }
            case LoopControlNode l: throw new LoopSignal(l.IsBreak, l.Line);
            default: throw new TemplateException($"cannot execute {node.GetType().Name}", node.Line);
        }
    }

    string RenderBlock(List<Node> body)
    {
        var inner = new StringBuilder();
        Exec(body, inner);
        return inner.ToString();
    }

    void ExecFor(ForNode f, StringBuilder sb)
    {
        var items = Builtins.Iterate(Eval(f.Iter), f.Line).ToList();
        RenderLimits.Charge(items.Count, f.Line);
        if (f.Filter != null)
        {
            items = items.Where(item =>
            {
                _scopes.Add(new());
                try { Bind(f.Targets, item, f.Line); return PyValues.Truthy(Eval(f.Filter)); }
                finally { _scopes.RemoveAt(_scopes.Count - 1); }
            }).ToList();
        }
        if (items.Count == 0) { if (f.Else != null) Exec(f.Else, sb); return; }
        _scopes.Add(new());
        try
        {
            for (int i = 0; i < items.Count; i++)
            {
                var loop = new Dictionary<string, object?>
                {
                    ["index"] = (long)(i + 1), ["index0"] = (long)i, ["first"] = i == 0, ["last"] = i == items.Count - 1,
                    ["length"] = (long)items.Count, ["revindex"] = (long)(items.Count - i), ["revindex0"] = (long)(items.Count - i - 1),
                    ["previtem"] = i > 0 ? items[i - 1] : Undefined.Instance,
                    ["nextitem"] = i + 1 < items.Count ? items[i + 1] : Undefined.Instance,
                };
                int idx = i;
                loop["cycle"] = (Callable)((args, _) => args.Count == 0 ? Undefined.Instance : args[idx % args.Count]);
                _scopes[^1]["loop"] = loop;
                RenderLimits.Charge(RenderLimits.IterationCost, f.Line);
                Bind(f.Targets, items[i], f.Line);
                try { Exec(f.Body, sb); }
                catch (LoopSignal s) { if (s.IsBreak) break; }
            }
        }
        finally { _scopes.RemoveAt(_scopes.Count - 1); }
    }

    void Bind(List<string> targets, object? item, int line)
    {
        if (targets.Count == 1) { _scopes[^1][targets[0]] = item; return; }
        var parts = Builtins.Iterate(item, line).ToList();
        if (parts.Count != targets.Count) throw new TemplateException($"cannot unpack {parts.Count} values into {targets.Count} names", line);
        for (int k = 0; k < targets.Count; k++) _scopes[^1][targets[k]] = parts[k];
    }

    Callable MakeMacro(MacroNode m) => (args, kwargs) =>
    {
        var scope = new Dictionary<string, object?>();
        for (int i = 0; i < m.Params.Count; i++)
        {
            var (name, dflt) = m.Params[i];
            scope[name] = i < args.Count ? args[i] : kwargs.TryGetValue(name, out var kv) ? kv : dflt != null ? Eval(dflt) : Undefined.Instance;
        }
        _scopes.Add(scope);
        try { return RenderBlock(m.Body); }
        catch (LoopSignal s) { throw new TemplateException($"'{(s.IsBreak ? "break" : "continue")}' outside a for loop", s.Line); }
        finally { _scopes.RemoveAt(_scopes.Count - 1); }
    };

    public object? Eval(Expr e)
    {
        using var depth = RenderLimits.Enter(e.Line);
        try { return EvalCore(e); }
        catch (Exception x) when (x is ArgumentException or InvalidCastException or ArithmeticException or FormatException
                                      or IndexOutOfRangeException or InvalidOperationException or NullReferenceException or KeyNotFoundException)
        {
            // A builtin given arguments it cannot use (too few, wrong type, out of range): the template's error, not ours.
            if (x.InnerException is TemplateException inner) throw inner;
            throw new TemplateException($"{Describe(e)}: invalid arguments or operands", e.Line);
        }
    }

    object? EvalCore(Expr e)
    {
        switch (e)
        {
            case Literal l: return l.Value;
            case NameExpr n: return Lookup(n.Name);
            case ListExpr l: return l.Items.Select(Eval).ToList();
            case DictExpr d:
            {
                var dict = new Dictionary<string, object?>();
                foreach (var (dk, dv) in d.Items) dict[PyValues.Str(Eval(dk))] = Eval(dv); // a repeated key keeps the last value, as in Python
                return dict;
            }
            case AttrExpr a: return Builtins.GetAttr(Eval(a.Target), a.Name, a.Line);
            case IndexExpr i: return Builtins.GetItem(Eval(i.Target), Eval(i.Index), i.Line);
            case SliceExpr s:
                return Builtins.Slice(Eval(s.Target), s.Start is null ? null : Eval(s.Start), s.Stop is null ? null : Eval(s.Stop),
                    s.Step is null ? null : Eval(s.Step), s.Line);
            case CallExpr c:
            {
                var target = Eval(c.Target);
                if (target is not Callable fn) throw new TemplateException($"{Describe(c.Target)} is not callable", c.Line);
                return RenderLimits.Checked(fn(c.Args.Select(Eval).ToList(), Kwargs(c.Kwargs)), c.Line);
            }
            case FilterExpr f:
                return RenderLimits.Checked(Builtins.Filter(f.Name, Eval(f.Target), f.Args.Select(Eval).ToList(), Kwargs(f.Kwargs), f.Line), f.Line);
            case TestExpr t:
            {
                bool r = Builtins.Test(t.Name, Eval(t.Target), t.Args.Select(Eval).ToList(), t.Line);
                return t.Negated ? !r : r;
            }
            case UnaryExpr u:
                var v = Eval(u.Operand);
                return u.Op == "not" ? !PyValues.Truthy(v) : v switch
                {
                    long l => (object)(-l),
                    double d => (object)(-d),
                    _ => throw new TemplateException($"cannot negate {PyValues.TypeName(v)}", u.Line),
                };
            case BinaryExpr b:
                if (b.Op == "and") { var l = Eval(b.Left); return PyValues.Truthy(l) ? Eval(b.Right) : l; }
                if (b.Op == "or") { var l = Eval(b.Left); return PyValues.Truthy(l) ? l : Eval(b.Right); }
                return RenderLimits.Checked(Builtins.Binary(b.Op, Eval(b.Left), Eval(b.Right), b.Line), b.Line);
            case CondExpr c:
                return PyValues.Truthy(Eval(c.Cond)) ? Eval(c.Then) : c.Else != null ? Eval(c.Else) : Undefined.Instance;
            default:
                throw new TemplateException($"cannot evaluate {e.GetType().Name}", e.Line);
        }
    }

    Dictionary<string, object?> Kwargs(List<(string name, Expr value)> kwargs)
    {
        var d = new Dictionary<string, object?>();
        foreach (var (name, value) in kwargs) d[name] = Eval(value);
        return d;
    }

    static string Describe(Expr e) => e switch
    {
        NameExpr n => $"'{n.Name}'",
        AttrExpr a => $"'{a.Name}'",
        CallExpr c => $"call of {Describe(c.Target)}",
        FilterExpr f => $"filter '{f.Name}'",
        TestExpr t => $"test '{t.Name}'",
        BinaryExpr b => $"operator '{b.Op}'",
        UnaryExpr u => $"operator '{u.Op}'",
        _ => "value",
    };
}
