using System.Runtime.CompilerServices;

namespace LoraKit.Templating;

/// <summary>
/// Bounds on what one rendering may do, so a hostile or broken chat template (it ships inside a model's
/// tokenizer_config.json) fails with a clear <see cref="TemplateException"/> in well under a second instead of
/// overflowing the stack, growing to gigabytes or looping for hours. Real chat templates stay orders of magnitude below
/// every limit. The budget is per rendering and per thread (a rendering never leaves its thread).
/// </summary>
internal static class RenderLimits
{
    /// <summary>Nesting of statements, expressions and macro calls (Jinja templates nest a few levels; recursion for JSON schemas a few dozen).</summary>
    public const int MaxDepth = 250;

    /// <summary>Characters in any one string and in the rendered output.</summary>
    public const long MaxChars = 4_000_000;

    /// <summary>Items in any one list (range(), repetition, concatenation).</summary>
    public const long MaxItems = 1_000_000;

    /// <summary>Total work of one rendering: expression evaluations, loop iterations, characters and items produced.</summary>
    public const long MaxWork = 5_000_000;

    /// <summary>What one loop iteration costs (it builds the loop object and binds the targets: several evaluations' worth).</summary>
    public const int IterationCost = 16;

    /// <summary>Work used by the last rendering on this thread (for tests that check realistic templates stay far below the limit).</summary>
    public static long WorkUsed => _work;

    [ThreadStatic] static long _work;
    [ThreadStatic] static int _depth;
    [ThreadStatic] static int _active;

    /// <summary>Starts a rendering's budget (nested renderings share the outer one).</summary>
    internal static Scope Begin()
    {
        if (_active++ == 0) { _work = 0; _depth = 0; }
        return new Scope();
    }

    internal readonly struct Scope : IDisposable
    {
        public void Dispose() => _active--;
    }

    /// <summary>Counts <paramref name="units"/> of work against the rendering's budget.</summary>
    public static void Charge(long units, int line = 0)
    {
        _work += Math.Max(units, 0);
        if (_work > MaxWork)
            throw new TemplateException($"rendering exceeded its work limit ({MaxWork:N0} steps); the template loops or builds values without bound", line);
    }

    /// <summary>Enters one level of nesting; dispose to leave it.</summary>
    internal static DepthGuard Enter(int line)
    {
        if (++_depth > MaxDepth)
        {
            _depth--;
            throw new TemplateException($"template nests or recurses deeper than {MaxDepth} levels (a macro calling itself without end?)", line);
        }
        if (!RuntimeHelpers.TryEnsureSufficientExecutionStack())
        {
            _depth--;
            throw new TemplateException("template nests or recurses too deeply for the stack", line);
        }
        Charge(1, line);
        return new DepthGuard();
    }

    internal readonly struct DepthGuard : IDisposable
    {
        public void Dispose() => _depth--;
    }

    /// <summary>Refuses a string of <paramref name="length"/> characters before it is built (charges nothing: callers charge what they copy).</summary>
    public static void CheckChars(long length, int line = 0, string what = "a string")
    {
        if (length > MaxChars)
            throw new TemplateException($"{what} would be {length:N0} characters, over the {MaxChars:N0}-character limit", line);
    }

    /// <summary>Refuses a list of <paramref name="count"/> items before it is built.</summary>
    public static void CheckItems(long count, int line = 0, string what = "a list")
    {
        if (count > MaxItems)
            throw new TemplateException($"{what} would have {count:N0} items, over the {MaxItems:N0}-item limit", line);
        Charge(count, line);
    }

    /// <summary>Checks a value just built (string length or list size); returns it.</summary>
    public static object? Checked(object? v, int line = 0)
    {
        switch (v)
        {
            case string s: CheckChars(s.Length, line); Charge(s.Length / 16, line); break;
            case List<object?> l: CheckItems(l.Count, line); break;
        }
        return v;
    }
}
