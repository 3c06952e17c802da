namespace LoraKit.Templating;

// ---- AST ----
internal abstract record Node(int Line);
internal sealed record TextNode(string Text, int Line) : Node(Line);
internal sealed record OutputNode(Expr Value, int Line) : Node(Line);
internal sealed record IfNode(List<(Expr cond, List<Node> body)> Branches, List<Node>? Else, int Line) : Node(Line);
internal sealed record ForNode(List<string> Targets, Expr Iter, Expr? Filter, List<Node> Body, List<Node>? Else, int Line) : Node(Line);
internal sealed record SetNode(string Name, string? Attr, Expr? Value, List<Node>? Block, int Line) : Node(Line);
internal sealed record MacroNode(string Name, List<(string name, Expr? dflt)> Params, List<Node> Body, int Line) : Node(Line);
internal sealed record LoopControlNode(bool IsBreak, int Line) : Node(Line);
internal sealed record CallBlockNode(Expr Call, List<Node> Body, int Line) : Node(Line);

internal abstract record Expr(int Line);
internal sealed record Literal(object? Value, int Line) : Expr(Line);
internal sealed record NameExpr(string Name, int Line) : Expr(Line);
internal sealed record ListExpr(List<Expr> Items, int Line) : Expr(Line);
internal sealed record DictExpr(List<(Expr key, Expr value)> Items, int Line) : Expr(Line);
internal sealed record AttrExpr(Expr Target, string Name, int Line) : Expr(Line);
internal sealed record IndexExpr(Expr Target, Expr Index, int Line) : Expr(Line);
internal sealed record SliceExpr(Expr Target, Expr? Start, Expr? Stop, Expr? Step, int Line) : Expr(Line);
internal sealed record CallExpr(Expr Target, List<Expr> Args, List<(string name, Expr value)> Kwargs, int Line) : Expr(Line);
internal sealed record FilterExpr(Expr Target, string Name, List<Expr> Args, List<(string name, Expr value)> Kwargs, int Line) : Expr(Line);
internal sealed record TestExpr(Expr Target, string Name, List<Expr> Args, bool Negated, int Line) : Expr(Line);
internal sealed record UnaryExpr(string Op, Expr Operand, int Line) : Expr(Line);
internal sealed record BinaryExpr(string Op, Expr Left, Expr Right, int Line) : Expr(Line);
internal sealed record CondExpr(Expr Cond, Expr Then, Expr? Else, int Line) : Expr(Line);

/// <summary>Recursive-descent parser for the Jinja subset chat templates use, with Jinja's operator precedence.</summary>
internal sealed class Parser
{
    readonly List<Tok> _t;
    int _p, _depth;

    /// <summary>Nesting of blocks and sub-expressions; deeper templates are refused before they can overflow the stack.</summary>
    public const int MaxDepth = 200;

    Nest Enter()
    {
        if (++_depth > MaxDepth) throw new TemplateException($"template nests deeper than {MaxDepth} levels", Peek.Line);
        if (!System.Runtime.CompilerServices.RuntimeHelpers.TryEnsureSufficientExecutionStack())
            throw new TemplateException("template nests too deeply for the stack", Peek.Line);
        return new Nest(this);
    }

    readonly struct Nest(Parser p) : IDisposable { public void Dispose() => p._depth--; }

    Parser(List<Tok> tokens) { _t = tokens; }

    public static List<Node> Parse(string template)
    {
        var p = new Parser(Lexer.Tokenize(template));
        var body = p.ParseBody([]);
        if (p.Peek.Kind != TokKind.End) throw new TemplateException($"unexpected '{p.Peek.Value}'", p.Peek.Line);
        return body;
    }

    Tok Peek => _t[Math.Min(_p, _t.Count - 1)];
    Tok PeekAt(int k) => _t[Math.Min(_p + k, _t.Count - 1)];
    Tok Next() => _t[Math.Min(_p++, _t.Count - 1)];

    bool IsOp(string op) => Peek.Kind == TokKind.Op && Peek.Value == op;
    bool IsName(string n) => Peek.Kind == TokKind.Name && Peek.Value == n;

    Tok Expect(TokKind kind, string? value = null)
    {
        var t = Next();
        if (t.Kind != kind || (value != null && t.Value != value))
            throw new TemplateException($"expected {value ?? kind.ToString()} but found '{t.Value}' ({t.Kind})", t.Line);
        return t;
    }

    string ExpectName() => Expect(TokKind.Name).Value;

    /// <summary>Parses nodes until a block tag whose keyword is in <paramref name="stops"/> (left unconsumed).</summary>
    List<Node> ParseBody(HashSet<string> stops)
    {
        var nodes = new List<Node>();
        while (true)
        {
            var t = Peek;
            switch (t.Kind)
            {
                case TokKind.End:
                    if (stops.Count > 0) throw new TemplateException($"missing {{% {string.Join(" / ", stops)} %}}", t.Line);
                    return nodes;
                case TokKind.Text:
                    Next();
                    nodes.Add(new TextNode(t.Value, t.Line));
                    break;
                case TokKind.VarStart:
                    Next();
                    var e = ParseExpr();
                    Expect(TokKind.VarEnd);
                    nodes.Add(new OutputNode(e, t.Line));
                    break;
                case TokKind.BlockStart:
                    var kw = PeekAt(1);
                    if (kw.Kind == TokKind.Name && stops.Contains(kw.Value)) return nodes;
                    Next();
                    nodes.Add(ParseStatement());
                    break;
                default:
                    throw new TemplateException($"unexpected '{t.Value}'", t.Line);
            }
        }
    }

    Node ParseStatement()
    {
        using var nest = Enter();
        var kw = Next();
        if (kw.Kind != TokKind.Name) throw new TemplateException("expected a statement keyword", kw.Line);
        switch (kw.Value)
        {
            case "if": return ParseIf(kw.Line);
            case "for": return ParseFor(kw.Line);
            case "set": return ParseSet(kw.Line);
            case "macro": return ParseMacro(kw.Line);
            case "call": return ParseCallBlock(kw.Line);
            case "break" or "continue":
                Expect(TokKind.BlockEnd);
                return new LoopControlNode(kw.Value == "break", kw.Line);
            case "generation" or "endgeneration": // transformers' assistant-mask marker: renders its body unchanged
                Expect(TokKind.BlockEnd);
                return new TextNode("", kw.Line);
            default:
                throw new TemplateException($"unsupported statement '{kw.Value}'", kw.Line);
        }
    }

    void EndTag(string name) { Expect(TokKind.BlockStart); Expect(TokKind.Name, name); Expect(TokKind.BlockEnd); }

    Node ParseIf(int line)
    {
        var branches = new List<(Expr, List<Node>)>();
        var cond = ParseExpr();
        Expect(TokKind.BlockEnd);
        List<Node>? elseBody = null;
        while (true)
        {
            var body = ParseBody(["elif", "else", "endif"]);
            branches.Add((cond, body));
            Expect(TokKind.BlockStart);
            var kw = ExpectName();
            if (kw == "elif") { cond = ParseExpr(); Expect(TokKind.BlockEnd); continue; }
            Expect(TokKind.BlockEnd);
            if (kw == "else") { elseBody = ParseBody(["endif"]); EndTag("endif"); }
            return new IfNode(branches, elseBody, line);
        }
    }

    Node ParseFor(int line)
    {
        var targets = new List<string> { ExpectName() };
        while (IsOp(",")) { Next(); targets.Add(ExpectName()); }
        Expect(TokKind.Name, "in");
        var iter = ParseExpr(allowCond: false);
        Expr? filter = null;
        if (IsName("if")) { Next(); filter = ParseExpr(allowCond: false); }
        Expect(TokKind.BlockEnd);
        var body = ParseBody(["else", "endfor"]);
        List<Node>? elseBody = null;
        Expect(TokKind.BlockStart);
        var kw = ExpectName();
        Expect(TokKind.BlockEnd);
        if (kw == "else") { elseBody = ParseBody(["endfor"]); EndTag("endfor"); }
        return new ForNode(targets, iter, filter, body, elseBody, line);
    }

    Node ParseSet(int line)
    {
        var name = ExpectName();
        string? attr = null;
        if (IsOp(".")) { Next(); attr = ExpectName(); }
        if (IsOp("="))
        {
            Next();
            var value = ParseExpr();
            if (IsOp(",")) // tuple literal without brackets
            {
                var items = new List<Expr> { value };
                while (IsOp(",")) { Next(); items.Add(ParseExpr()); }
                value = new ListExpr(items, line);
            }
            Expect(TokKind.BlockEnd);
            return new SetNode(name, attr, value, null, line);
        }
        Expect(TokKind.BlockEnd);
        var block = ParseBody(["endset"]);
        EndTag("endset");
        return new SetNode(name, attr, null, block, line);
    }

    Node ParseMacro(int line)
    {
        var name = ExpectName();
        Expect(TokKind.Op, "(");
        var ps = new List<(string, Expr?)>();
        while (!IsOp(")"))
        {
            var pn = ExpectName();
            Expr? d = null;
            if (IsOp("=")) { Next(); d = ParseExpr(); }
            ps.Add((pn, d));
            if (IsOp(",")) Next();
        }
        Next();
        Expect(TokKind.BlockEnd);
        var body = ParseBody(["endmacro"]);
        EndTag("endmacro");
        return new MacroNode(name, ps, body, line);
    }

    Node ParseCallBlock(int line)
    {
        var call = ParseExpr();
        Expect(TokKind.BlockEnd);
        var body = ParseBody(["endcall"]);
        EndTag("endcall");
        return new CallBlockNode(call, body, line);
    }

    // ---- expressions, lowest precedence first ----
    Expr ParseExpr(bool allowCond = true)
    {
        using var nest = Enter();
        var e = ParseOr();
        if (allowCond && IsName("if"))
        {
            int line = Next().Line;
            var cond = ParseOr();
            Expr? els = null;
            if (IsName("else")) { Next(); els = ParseExpr(); }
            return new CondExpr(cond, e, els, line);
        }
        return e;
    }

    Expr ParseOr()
    {
        var e = ParseAnd();
        while (IsName("or")) { int l = Next().Line; e = new BinaryExpr("or", e, ParseAnd(), l); }
        return e;
    }

    Expr ParseAnd()
    {
        var e = ParseNot();
        while (IsName("and")) { int l = Next().Line; e = new BinaryExpr("and", e, ParseNot(), l); }
        return e;
    }

    Expr ParseNot()
    {
        if (IsName("not")) { using var nest = Enter(); int l = Next().Line; return new UnaryExpr("not", ParseNot(), l); }
        return ParseCompare();
    }

    Expr ParseCompare()
    {
        var e = ParseMath1();
        while (true)
        {
            int l = Peek.Line;
            if (Peek.Kind == TokKind.Op && Peek.Value is "==" or "!=" or "<" or ">" or "<=" or ">=")
            {
                var op = Next().Value;
                e = new BinaryExpr(op, e, ParseMath1(), l);
            }
            else if (IsName("in")) { Next(); e = new BinaryExpr("in", e, ParseMath1(), l); }
            else if (IsName("not") && PeekAt(1).Kind == TokKind.Name && PeekAt(1).Value == "in")
            {
                _p += 2;
                e = new UnaryExpr("not", new BinaryExpr("in", e, ParseMath1(), l), l);
            }
            else return e;
        }
    }

    Expr ParseMath1()
    {
        var e = ParseConcat();
        while (IsOp("+") || IsOp("-")) { var t = Next(); e = new BinaryExpr(t.Value, e, ParseConcat(), t.Line); }
        return e;
    }

    Expr ParseConcat()
    {
        var e = ParseMath2();
        while (IsOp("~")) { var t = Next(); e = new BinaryExpr("~", e, ParseMath2(), t.Line); }
        return e;
    }

    Expr ParseMath2()
    {
        var e = ParsePow();
        while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) { var t = Next(); e = new BinaryExpr(t.Value, e, ParsePow(), t.Line); }
        return e;
    }

    Expr ParsePow()
    {
        var e = ParseUnary();
        while (IsOp("**")) { var t = Next(); e = new BinaryExpr("**", e, ParseUnary(), t.Line); }
        return e;
    }

    Expr ParseUnary()
    {
        using var nest = Enter();
        if (IsOp("-")) { var t = Next(); return ParseFilters(new UnaryExpr("-", ParseUnary(), t.Line)); }
        if (IsOp("+")) { Next(); return ParseUnary(); }
        return ParseFilters(ParsePostfix(ParsePrimary()));
    }

    static readonly HashSet<string> TestsWithArgument =
        ["divisibleby", "equalto", "eq", "ne", "sameas", "gt", "ge", "lt", "le", "greaterthan", "lessthan", "in"];

    /// <summary>Filters (<c>|f</c>) and tests (<c>is t</c>) bind tighter than any binary operator, as in Jinja.</summary>
    Expr ParseFilters(Expr e)
    {
        while (true)
        {
            if (IsOp("|"))
            {
                int l = Next().Line;
                var name = ExpectName();
                var (args, kwargs) = IsOp("(") ? ParseArgs() : ([], []);
                e = ParsePostfix(new FilterExpr(e, name, args, kwargs, l));
            }
            else if (IsName("is"))
            {
                int l = Next().Line;
                bool neg = false;
                if (IsName("not")) { Next(); neg = true; }
                var name = Next();
                if (name.Kind != TokKind.Name) throw new TemplateException("expected a test name after 'is'", l);
                var args = new List<Expr>();
                if (IsOp("(")) args = ParseArgs().args;
                else if (TestsWithArgument.Contains(name.Value) && Peek.Kind is not (TokKind.BlockEnd or TokKind.VarEnd or TokKind.Op))
                    args.Add(ParsePostfix(ParsePrimary())); // `x is divisibleby 3`
                e = new TestExpr(e, name.Value, args, neg, l);
            }
            else return e;
        }
    }

    Expr ParsePostfix(Expr e)
    {
        while (true)
        {
            if (IsOp("."))
            {
                Next();
                var t = Next();
                e = t.Kind is TokKind.Name or TokKind.Int
                    ? (t.Kind == TokKind.Int ? new IndexExpr(e, IntLiteral(t), t.Line) : new AttrExpr(e, t.Value, t.Line))
                    : throw new TemplateException("expected an attribute name after '.'", t.Line);
            }
            else if (IsOp("["))
            {
                int l = Next().Line;
                Expr? start = null, stop = null, step = null;
                bool isSlice = false;
                if (!IsOp(":")) start = ParseExpr();
                if (IsOp(":"))
                {
                    isSlice = true; Next();
                    if (!IsOp(":") && !IsOp("]")) stop = ParseExpr();
                    if (IsOp(":")) { Next(); if (!IsOp("]")) step = ParseExpr(); }
                }
                Expect(TokKind.Op, "]");
                e = isSlice ? new SliceExpr(e, start, stop, step, l) : new IndexExpr(e, start!, l);
            }
            else if (IsOp("("))
            {
                int l = Peek.Line;
                var (args, kwargs) = ParseArgs();
                e = new CallExpr(e, args, kwargs, l);
            }
            else return e;
        }
    }

    (List<Expr> args, List<(string, Expr)> kwargs) ParseArgs()
    {
        Expect(TokKind.Op, "(");
        var args = new List<Expr>();
        var kwargs = new List<(string, Expr)>();
        while (!IsOp(")"))
        {
            if (Peek.Kind == TokKind.Name && PeekAt(1).Kind == TokKind.Op && PeekAt(1).Value == "=")
            {
                var n = Next().Value; Next();
                kwargs.Add((n, ParseExpr()));
            }
            else args.Add(ParseExpr());
            if (IsOp(",")) Next();
            else if (!IsOp(")")) throw new TemplateException($"expected ',' or ')' but found '{Peek.Value}'", Peek.Line);
        }
        Next();
        return (args, kwargs);
    }

    /// <summary>An integer literal; one beyond 64 bits becomes a float (Python's ints are unbounded, ours are not).</summary>
    static Literal IntLiteral(Tok t) =>
        long.TryParse(t.Value, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out long v)
            ? new Literal(v, t.Line)
            : new Literal(double.Parse(t.Value, System.Globalization.CultureInfo.InvariantCulture), t.Line);

    Expr ParsePrimary()
    {
        var t = Next();
        switch (t.Kind)
        {
            case TokKind.String:
                var s = t.Value; // adjacent string literals concatenate
                while (Peek.Kind == TokKind.String) s += Next().Value;
                return new Literal(s, t.Line);
            case TokKind.Int: return IntLiteral(t);
            case TokKind.Float: return new Literal(double.Parse(t.Value, System.Globalization.CultureInfo.InvariantCulture), t.Line);
            case TokKind.Name:
                return t.Value switch
                {
                    "true" or "True" => new Literal(true, t.Line),
                    "false" or "False" => new Literal(false, t.Line),
                    "none" or "None" => new Literal(null, t.Line),
                    _ => new NameExpr(t.Value, t.Line),
                };
            case TokKind.Op when t.Value == "(":
            {
                if (IsOp(")")) { Next(); return new ListExpr([], t.Line); }
                var e = ParseExpr();
                if (IsOp(","))
                {
                    var items = new List<Expr> { e };
                    while (IsOp(",")) { Next(); if (IsOp(")")) break; items.Add(ParseExpr()); }
                    Expect(TokKind.Op, ")");
                    return new ListExpr(items, t.Line);
                }
                Expect(TokKind.Op, ")");
                return e;
            }
            case TokKind.Op when t.Value == "[":
            {
                var items = new List<Expr>();
                while (!IsOp("]")) { items.Add(ParseExpr()); if (IsOp(",")) Next(); }
                Next();
                return new ListExpr(items, t.Line);
            }
            case TokKind.Op when t.Value == "{":
            {
                var items = new List<(Expr, Expr)>();
                while (!IsOp("}"))
                {
                    var k = ParseExpr();
                    Expect(TokKind.Op, ":");
                    items.Add((k, ParseExpr()));
                    if (IsOp(",")) Next();
                }
                Next();
                return new DictExpr(items, t.Line);
            }
            default:
                throw new TemplateException($"unexpected '{t.Value}' in expression", t.Line);
        }
    }
}
