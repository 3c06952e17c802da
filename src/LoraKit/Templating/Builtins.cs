using System.Globalization;

namespace LoraKit.Templating;

/// <summary>Jinja's globals, filters, tests, operators and the Python methods chat templates call on values.</summary>
internal static class Builtins
{
    public static Dictionary<string, object?> Globals() => new()
    {
        ["raise_exception"] = (Callable)((a, _) => throw new TemplateException(a.Count > 0 ? PyValues.Str(a[0]) : "raise_exception called")),
        ["namespace"] = (Callable)((a, kw) =>
        {
            var ns = new Namespace();
            foreach (var d in a.OfType<Dictionary<string, object?>>()) foreach (var kv in d) ns[kv.Key] = kv.Value;
            foreach (var kv in kw) ns[kv.Key] = kv.Value;
            return ns;
        }),
        ["dict"] = (Callable)((_, kw) => new Dictionary<string, object?>(kw)),
        ["range"] = (Callable)((a, _) =>
        {
            long start = 0, stop, step = 1;
            if (a.Count == 1) stop = Int(a[0]);
            else { start = Int(a[0]); stop = Int(a[1]); if (a.Count > 2) step = Int(a[2]); }
            if (step == 0) throw new TemplateException("range() step must not be zero");
            // Count first (in floating point: the bounds may be anything), so range(10**12) is refused, not built.
            double count = Math.Max(0, Math.Ceiling(((double)stop - start) / step));
            RenderLimits.CheckItems((long)Math.Min(count, long.MaxValue / 2), 0, "range()");
            var r = new List<object?>();
            for (long i = start; step > 0 ? i < stop : i > stop; i += step) r.Add(i);
            return r;
        }),
        ["strftime_now"] = (Callable)((a, _) => StrFTime(DateTime.Now, a.Count > 0 ? PyValues.Str(a[0])
            : throw new TemplateException("strftime_now() needs a format"))),
    };

    static long Int(object? v) => v is long l ? l : v is double d ? (long)d : v is bool b ? (b ? 1 : 0)
        : throw new TemplateException($"expected an integer, got {PyValues.TypeName(v)}");

    public static IEnumerable<object?> Iterate(object? v, int line) => v switch
    {
        null => throw new TemplateException("'NoneType' object is not iterable", line),
        Undefined => [],
        List<object?> l => l,
        Dictionary<string, object?> d => d.Keys,
        string s => StringChars(s),
        _ => throw new TemplateException($"'{PyValues.TypeName(v)}' object is not iterable", line),
    };

    static IEnumerable<object?> StringChars(string s)
    {
        RenderLimits.Charge(s.Length / 4);
        for (int i = 0; i < s.Length;)
        {
            int len = char.IsSurrogatePair(s, i) ? 2 : 1;
            yield return s.Substring(i, len);
            i += len;
        }
    }

    /// <summary><c>x.name</c>: methods first, then items (Jinja's getattr order).</summary>
    public static object? GetAttr(object? target, string name, int line)
    {
        if (target is Undefined) throw new TemplateException($"'{name}' of an undefined value", line);
        if (target is null) throw new TemplateException($"'None' has no attribute '{name}'", line);
        if (Method(target, name) is { } m) return m;
        if (target is Dictionary<string, object?> d) return d.TryGetValue(name, out var v) ? v : Undefined.Instance;
        return Undefined.Instance;
    }

    /// <summary><c>x[key]</c>: items first, then attributes (Jinja's getitem order).</summary>
    public static object? GetItem(object? target, object? key, int line)
    {
        switch (target)
        {
            case Dictionary<string, object?> d:
                if (key is string k && d.TryGetValue(k, out var v)) return v;
                return key is string ks && Method(target, ks) is { } m ? m : Undefined.Instance;
            case List<object?> l when key is long i:
                if (i < 0) i += l.Count;
                return i >= 0 && i < l.Count ? l[(int)i] : Undefined.Instance;
            case string s when key is long i:
            {
                var chars = StringChars(s).ToList();
                if (i < 0) i += chars.Count;
                return i >= 0 && i < chars.Count ? chars[(int)i] : Undefined.Instance;
            }
            case Undefined:
                throw new TemplateException($"cannot index an undefined value with {PyValues.Repr(key)}", line);
            case null:
                throw new TemplateException("'None' is not subscriptable", line);
            default:
                return key is string name ? GetAttr(target, name, line) : Undefined.Instance;
        }
    }

    public static object? Slice(object? target, object? start, object? stop, object? step, int line)
    {
        List<object?> items = target switch
        {
            List<object?> l => l,
            string s => StringChars(s).ToList(),
            _ => throw new TemplateException($"cannot slice {PyValues.TypeName(target)}", line),
        };
        long n = items.Count, st = step is null ? 1 : Int(step);
        if (st == 0) throw new TemplateException("slice step cannot be zero", line);
        long Norm(object? v, long dflt)
        {
            if (v is null) return dflt;
            long x = Int(v);
            if (x < 0) x += n;
            return st > 0 ? Math.Clamp(x, 0, n) : Math.Clamp(x, -1, n - 1);
        }
        long a = Norm(start, st > 0 ? 0 : n - 1), b = Norm(stop, st > 0 ? n : -1);
        var result = new List<object?>();
        for (long i = a; st > 0 ? i < b : i > b; i += st) result.Add(items[(int)i]);
        return target is string ? string.Concat(result.Select(PyValues.Str)) : result;
    }

    static Callable? Method(object target, string name)
    {
        switch (target)
        {
            case string s:
                return name switch
                {
                    "strip" => (a, _) => a.Count > 0 && a[0] is string c ? s.Trim(c.ToCharArray()) : s.Trim(),
                    "lstrip" => (a, _) => a.Count > 0 && a[0] is string c ? s.TrimStart(c.ToCharArray()) : s.TrimStart(),
                    "rstrip" => (a, _) => a.Count > 0 && a[0] is string c ? s.TrimEnd(c.ToCharArray()) : s.TrimEnd(),
                    "split" => (a, kw) => Split(s, a.Count > 0 ? a[0] : kw.GetValueOrDefault("sep"), a.Count > 1 ? Int(a[1]) : kw.TryGetValue("maxsplit", out var m) ? Int(m) : -1),
                    "startswith" => (a, _) => Prefixes(a[0]).Any(p => s.StartsWith(p, StringComparison.Ordinal)),
                    "endswith" => (a, _) => Prefixes(a[0]).Any(p => s.EndsWith(p, StringComparison.Ordinal)),
                    "upper" => (_, _) => s.ToUpperInvariant(),
                    "lower" => (_, _) => s.ToLowerInvariant(),
                    "title" => (_, _) => Title(s),
                    "capitalize" => (_, _) => s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant(),
                    "replace" => (a, _) => Replace(s, PyValues.Str(a[0]), PyValues.Str(a[1]), a.Count > 2 ? Int(a[2]) : -1),
                    "find" => (a, _) => (long)s.IndexOf(PyValues.Str(a[0]), StringComparison.Ordinal),
                    "count" => (a, _) => (long)CountOf(s, PyValues.Str(a[0])),
                    "join" => (a, _) => Join(s, Iterate(a[0], 0)),
                    "isdigit" => (_, _) => s.Length > 0 && s.All(char.IsDigit),
                    "isspace" => (_, _) => s.Length > 0 && s.All(char.IsWhiteSpace),
                    "splitlines" => (_, _) => s.Split('\n').Select(x => (object?)x.TrimEnd('\r')).ToList(),
                    _ => null,
                };
            case Dictionary<string, object?> d when target is not Namespace:
                return name switch
                {
                    "items" => (_, _) => d.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList(),
                    "keys" => (_, _) => d.Keys.Select(k => (object?)k).ToList(),
                    "values" => (_, _) => d.Values.ToList(),
                    "get" => (a, _) => d.TryGetValue(PyValues.Str(a[0]), out var v) ? v : a.Count > 1 ? a[1] : null,
                    _ => null,
                };
            case List<object?> l:
                return name switch
                {
                    "index" => (a, _) => (long)l.FindIndex(x => PyValues.Eq(x, a[0])),
                    "count" => (a, _) => (long)l.Count(x => PyValues.Eq(x, a[0])),
                    _ => null,
                };
            default: return null;
        }
    }

    static IEnumerable<string> Prefixes(object? p) => p is List<object?> l ? l.Select(PyValues.Str) : [PyValues.Str(p)];

    static List<object?> Split(string s, object? sep, long maxsplit)
    {
        if (sep is null or Undefined)
        {
            var parts = s.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            if (maxsplit < 0 || parts.Length <= maxsplit) return parts.Select(x => (object?)x).ToList();
            // Python keeps the remainder (left-stripped) as the last part.
            var res = new List<object?>();
            string rest = s.TrimStart();
            for (int i = 0; i < maxsplit; i++)
            {
                int k = rest.IndexOfAny([' ', '\t', '\n', '\r', '\f', '\v']);
                res.Add(rest[..k]);
                rest = rest[k..].TrimStart();
            }
            res.Add(rest);
            return res;
        }
        string sp = PyValues.Str(sep);
        if (sp.Length == 0) throw new TemplateException("empty separator");
        return (maxsplit < 0 ? s.Split(sp) : s.Split(sp, (int)maxsplit + 1)).Select(x => (object?)x).ToList();
    }

    static string Replace(string s, string a, string b, long count)
    {
        if (a.Length > 0 && b.Length > a.Length) // the result grows: size it before building it
            RenderLimits.CheckChars(s.Length + (long)CountOf(s, a) * (b.Length - a.Length), 0, "replace()'s result");
        if (count < 0) return a.Length == 0 ? s : s.Replace(a, b, StringComparison.Ordinal);
        var sb = new System.Text.StringBuilder();
        int pos = 0;
        for (long n = 0; n < count; n++)
        {
            int k = s.IndexOf(a, pos, StringComparison.Ordinal);
            if (k < 0) break;
            sb.Append(s, pos, k - pos).Append(b);
            pos = k + a.Length;
        }
        return sb.Append(s, pos, s.Length - pos).ToString();
    }

    static int CountOf(string s, string sub)
    {
        if (sub.Length == 0) return s.Length + 1;
        int n = 0;
        for (int k = s.IndexOf(sub, StringComparison.Ordinal); k >= 0; k = s.IndexOf(sub, k + sub.Length, StringComparison.Ordinal)) n++;
        return n;
    }

    static string Title(string s)
    {
        var chars = s.ToCharArray();
        bool prevLetter = false;
        for (int i = 0; i < chars.Length; i++)
        {
            chars[i] = prevLetter ? char.ToLowerInvariant(chars[i]) : char.ToUpperInvariant(chars[i]);
            prevLetter = char.IsLetter(chars[i]);
        }
        return new string(chars);
    }

    public static object? Binary(string op, object? a, object? b, int line)
    {
        switch (op)
        {
            case "==": return PyValues.Eq(a, b);
            case "!=": return !PyValues.Eq(a, b);
            case "<": return PyValues.Compare(a, b) < 0;
            case ">": return PyValues.Compare(a, b) > 0;
            case "<=": return PyValues.Compare(a, b) <= 0;
            case ">=": return PyValues.Compare(a, b) >= 0;
            case "in": return Contains(b, a, line);
            case "~": return PyValues.Str(a) + PyValues.Str(b);
            case "+":
                return (a, b) switch
                {
                    (string x, string y) => x + y,
                    (List<object?> x, List<object?> y) => x.Concat(y).ToList(),
                    (long x, long y) => x + y,
                    (long or double or bool, long or double or bool) => PyValues.ToDouble(a) + PyValues.ToDouble(b),
                    _ => throw new TemplateException($"cannot add {PyValues.TypeName(a)} and {PyValues.TypeName(b)}", line),
                };
            case "-":
                return (a, b) is (long x1, long y1) ? (object)(x1 - y1) : PyValues.ToDouble(a) - PyValues.ToDouble(b);
            case "*":
                return (a, b) switch
                {
                    (long x, long y) => x * y,
                    (string s, long n) => Repeat(s, n, line),
                    (long n, string s) => Repeat(s, n, line),
                    (List<object?> l, long n) => Repeat(l, n, line),
                    (long n, List<object?> l) => Repeat(l, n, line),
                    _ => PyValues.ToDouble(a) * PyValues.ToDouble(b),
                };
            case "/": return PyValues.ToDouble(a) / PyValues.ToDouble(b);
            case "//":
                if ((a, b) is (long x2, long y2))
                {
                    if (y2 == 0) throw new TemplateException("integer division by zero", line);
                    return (object)(long)Math.Floor((double)x2 / y2);
                }
                return Math.Floor(PyValues.ToDouble(a) / PyValues.ToDouble(b));
            case "%":
                if ((a, b) is (long x3, long y3))
                {
                    if (y3 == 0) throw new TemplateException("modulo by zero", line);
                    return (object)(((x3 % y3) + y3) % y3);
                }
                if (a is string) throw new TemplateException("%-formatting of strings is not supported", line);
                double m = PyValues.ToDouble(b);
                return PyValues.ToDouble(a) - m * Math.Floor(PyValues.ToDouble(a) / m);
            case "**":
                return (a, b) is (long x4, long y4) && y4 >= 0 ? (object)(long)Math.Pow(x4, y4) : Math.Pow(PyValues.ToDouble(a), PyValues.ToDouble(b));
            default: throw new TemplateException($"unknown operator '{op}'", line);
        }
    }

    static string Repeat(string s, long n, int line)
    {
        if (n <= 0 || s.Length == 0) return "";
        RenderLimits.CheckChars(s.Length * (double)n > long.MaxValue / 2 ? long.MaxValue / 2 : s.Length * n, line, "string repetition");
        return string.Concat(Enumerable.Repeat(s, (int)n));
    }

    static List<object?> Repeat(List<object?> l, long n, int line)
    {
        if (n <= 0 || l.Count == 0) return [];
        RenderLimits.CheckItems(l.Count * (double)n > long.MaxValue / 2 ? long.MaxValue / 2 : l.Count * n, line, "list repetition");
        var r = new List<object?>((int)(l.Count * n));
        for (long i = 0; i < n; i++) r.AddRange(l);
        return r;
    }

    /// <summary>str.join with the result's size checked as it grows (the items may repeat one long string).</summary>
    static string Join(string sep, IEnumerable<object?> items)
    {
        var sb = new System.Text.StringBuilder();
        bool first = true;
        foreach (var x in items)
        {
            var t = PyValues.Str(x);
            RenderLimits.CheckChars((long)sb.Length + sep.Length + t.Length, 0, "join()'s result");
            RenderLimits.Charge(1 + t.Length / 16);
            if (!first) sb.Append(sep);
            sb.Append(t);
            first = false;
        }
        return sb.ToString();
    }

    static bool Contains(object? container, object? item, int line) => container switch
    {
        string s => item is string sub ? s.Contains(sub, StringComparison.Ordinal) : throw new TemplateException("'in <string>' requires a string", line),
        List<object?> l => l.Any(x => PyValues.Eq(x, item)),
        Dictionary<string, object?> d => item is string k && d.ContainsKey(k),
        Undefined => false,
        _ => throw new TemplateException($"argument of type '{PyValues.TypeName(container)}' is not iterable", line),
    };

    public static bool Test(string name, object? v, List<object?> args, int line) => name switch
    {
        "defined" => v is not Undefined,
        "undefined" => v is Undefined,
        "none" => v is null,
        "string" => v is string,
        "number" => v is long or double,
        "integer" => v is long,
        "float" => v is double,
        "boolean" => v is bool,
        "true" => v is true,
        "false" => v is false,
        "mapping" => v is Dictionary<string, object?>,
        "iterable" => v is string or List<object?> or Dictionary<string, object?>,
        "sequence" => v is string or List<object?> or Dictionary<string, object?>,
        "callable" => v is Callable,
        "equalto" or "eq" or "==" => PyValues.Eq(v, args[0]),
        "ne" or "!=" => !PyValues.Eq(v, args[0]),
        "sameas" => ReferenceEquals(v, args[0]) || (v is null && args[0] is null) || (v is bool b1 && args[0] is bool b2 && b1 == b2),
        "gt" or "greaterthan" => PyValues.Compare(v, args[0]) > 0,
        "ge" => PyValues.Compare(v, args[0]) >= 0,
        "lt" or "lessthan" => PyValues.Compare(v, args[0]) < 0,
        "le" => PyValues.Compare(v, args[0]) <= 0,
        "in" => Contains(args[0], v, line),
        "odd" => Int(v) % 2 != 0,
        "even" => Int(v) % 2 == 0,
        "divisibleby" => Int(v) % Int(args[0]) == 0,
        "lower" => v is string s && s == s.ToLowerInvariant(),
        "upper" => v is string s2 && s2 == s2.ToUpperInvariant(),
        _ => throw new TemplateException($"unknown test '{name}'", line),
    };

    public static object? Filter(string name, object? v, List<object?> a, Dictionary<string, object?> kw, int line)
    {
        object? Arg(int i, string key, object? dflt = null) => i < a.Count ? a[i] : kw.TryGetValue(key, out var x) ? x : dflt;
        switch (name)
        {
            case "trim": return Arg(0, "chars") is string chars ? Str(v).Trim(chars.ToCharArray()) : Str(v).Trim();
            case "length" or "count":
                return v switch
                {
                    string s => (long)new StringInfo(s).LengthInTextElements,
                    List<object?> l => (long)l.Count,
                    Dictionary<string, object?> d => (long)d.Count,
                    Undefined => 0L,
                    _ => throw new TemplateException($"object of type '{PyValues.TypeName(v)}' has no length", line),
                };
            case "join":
            {
                var items = Iterate(v, line);
                if (Arg(1, "attribute") is string attr) items = items.Select(x => GetItem(x, attr, line));
                return Join(Str(Arg(0, "d", "")), items);
            }
            case "tojson":
                return PyValues.ToJson(v, Arg(0, "indent") is long ind ? (int)ind : null);
            case "upper": return Str(v).ToUpperInvariant();
            case "lower": return Str(v).ToLowerInvariant();
            case "title": return Title(Str(v));
            case "capitalize": { var s = Str(v); return s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant(); }
            case "string": return PyValues.Str(v);
            case "int": return v switch { long l => l, double d => (long)d, string s when long.TryParse(s.Trim(), out var r) => r, _ => Arg(0, "default", 0L) };
            case "float": return v switch { long l => (double)l, double d => d, string s when double.TryParse(s.Trim(), CultureInfo.InvariantCulture, out var r) => r, _ => Arg(0, "default", 0.0) };
            case "abs": return v is long l2 ? (object)Math.Abs(l2) : Math.Abs(PyValues.ToDouble(v));
            case "default" or "d":
            {
                bool boolean = PyValues.Truthy(Arg(1, "boolean", false));
                return v is Undefined || (boolean && !PyValues.Truthy(v)) ? Arg(0, "default_value", "") : v;
            }
            case "first": return Iterate(v, line).FirstOrDefault(Undefined.Instance);
            case "last": return v is List<object?> l3 && l3.Count > 0 ? l3[^1] : Iterate(v, line).LastOrDefault(Undefined.Instance);
            case "list": return Iterate(v, line).ToList();
            case "reverse": return v is string s3 ? new string(s3.Reverse().ToArray()) : Iterate(v, line).Reverse().ToList();
            case "unique": return Iterate(v, line).Aggregate(new List<object?>(), (acc, x) => { RenderLimits.Charge(acc.Count, line); if (!acc.Any(y => PyValues.Eq(x, y))) acc.Add(x); return acc; });
            case "sum": return Iterate(v, line).Aggregate((object?)0L, (acc, x) => Binary("+", acc, x, line));
            case "replace": return Replace(Str(v), Str(a[0]), Str(a[1]), a.Count > 2 ? Int(a[2]) : -1);
            case "safe": return v;
            case "e" or "escape" or "forceescape":
                return Str(v).Replace("&", "&amp;").Replace("<", "&lt;").Replace(">", "&gt;").Replace("\"", "&#34;").Replace("'", "&#39;");
            case "items": return v is Dictionary<string, object?> d2 ? d2.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList() : throw new TemplateException("items filter needs a mapping", line);
            case "dictsort":
                return v is Dictionary<string, object?> d3
                    ? d3.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList()
                    : throw new TemplateException("dictsort filter needs a mapping", line);
            case "select" or "reject":
            {
                bool keep = name == "select";
                string test = a.Count > 0 ? Str(a[0]) : "";
                return Iterate(v, line).Where(x => (a.Count == 0 ? PyValues.Truthy(x) : Test(test, x, a.Skip(1).ToList(), line)) == keep).ToList();
            }
            case "selectattr" or "rejectattr":
            {
                bool keep = name == "selectattr";
                string attr = Str(a[0]);
                return Iterate(v, line).Where(x =>
                {
                    var val = GetItem(x, attr, line);
                    return (a.Count < 2 ? PyValues.Truthy(val) : Test(Str(a[1]), val, a.Skip(2).ToList(), line)) == keep;
                }).ToList();
            }
            case "map":
            {
                if (kw.TryGetValue("attribute", out var attr))
                    return Iterate(v, line).Select(x => { var r = GetItem(x, Str(attr), line); return r is Undefined && kw.TryGetValue("default", out var dv) ? dv : r; }).ToList();
                string f = Str(a[0]);
                return Iterate(v, line).Select(x => Filter(f, x, a.Skip(1).ToList(), [], line)).ToList();
            }
            case "sort":
            {
                bool rev = PyValues.Truthy(Arg(0, "reverse", false));
                var items = Iterate(v, line).ToList();
                RenderLimits.Charge(items.Count * (long)Math.Ceiling(Math.Log2(items.Count + 2)), line);
                Func<object?, object?> key = kw.TryGetValue("attribute", out var at) ? x => GetItem(x, Str(at), line) : x => x;
                items.Sort((x, y) => PyValues.Compare(key(x), key(y)));
                if (rev) items.Reverse();
                return items;
            }
            case "indent":
            {
                var width = Arg(0, "width", 4L);
                long padLength = width is string ws0 ? ws0.Length : Math.Max(0, Int(width));
                var text = Str(v);
                RenderLimits.CheckChars(text.Length + padLength * (CountOf(text, "\n") + 1), line, "indent()'s result");
                string pad = width is string ws ? ws : new string(' ', (int)padLength);
                bool first = PyValues.Truthy(Arg(1, "first", false));
                var lines = text.Split('\n');
                for (int i = 0; i < lines.Length; i++)
                    if ((i > 0 || first) && lines[i].Length > 0) lines[i] = pad + lines[i];
                return string.Join("\n", lines);
            }
            case "round":
            {
                long precision = Arg(0, "precision") is long p ? p : 0;
                return Math.Round(PyValues.ToDouble(v), (int)Math.Clamp(precision, 0, 15), MidpointRounding.ToEven);
            }
            default: throw new TemplateException($"unknown filter '{name}'", line);
        }
    }

    static string Str(object? v) => PyValues.Str(v);

    /// <summary>The strftime directives chat templates use for dates (Llama 3.x: "%d %b %Y").</summary>
    public static string StrFTime(DateTime t, string fmt)
    {
        var sb = new System.Text.StringBuilder();
        for (int i = 0; i < fmt.Length; i++)
        {
            if (fmt[i] != '%' || i + 1 >= fmt.Length) { sb.Append(fmt[i]); continue; }
            char c = fmt[++i];
            sb.Append(c switch
            {
                'd' => t.ToString("dd", CultureInfo.InvariantCulture),
                'm' => t.ToString("MM", CultureInfo.InvariantCulture),
                'Y' => t.ToString("yyyy", CultureInfo.InvariantCulture),
                'y' => t.ToString("yy", CultureInfo.InvariantCulture),
                'b' => t.ToString("MMM", CultureInfo.InvariantCulture),
                'B' => t.ToString("MMMM", CultureInfo.InvariantCulture),
                'a' => t.ToString("ddd", CultureInfo.InvariantCulture),
                'A' => t.ToString("dddd", CultureInfo.InvariantCulture),
                'H' => t.ToString("HH", CultureInfo.InvariantCulture),
                'M' => t.ToString("mm", CultureInfo.InvariantCulture),
                'S' => t.ToString("ss", CultureInfo.InvariantCulture),
                'j' => t.DayOfYear.ToString("000", CultureInfo.InvariantCulture),
                '%' => "%",
                _ => "%" + c,
            });
        }
        return sb.ToString();
    }
}
