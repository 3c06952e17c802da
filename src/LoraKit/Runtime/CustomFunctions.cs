using System.Reflection;
using static TorchSharp.torch;

namespace LoraKit.Runtime;

/// <summary>
/// Keeps TorchSharp's custom autograd functions (TorchSharp 0.107) from holding memory that PyTorch's would not:
/// <list type="bullet">
/// <item>Each function call keeps an <c>empty_like</c> of every output for the node's lifetime (to materialise missing
/// output grads as zeros; PyTorch keeps only shape metadata). For a layer-sized output that is as much memory as saving
/// the output. <see cref="AfterApply"/> frees it right after apply(); the functions here disable grad
/// materialisation, so the cache is never read.</item>
/// <item>The gradients a backward returns are handed to libtorch as handles, and their C# wrappers would keep the tensors
/// alive until the GC finalises them (backward runs on the autograd engine's thread, outside any dispose scope).
/// libtorch has copied them by the time the same thread runs the next backward of these functions, so
/// <see cref="HandOff"/> frees each call's wrappers at that thread's next call.</item>
/// </list>
/// Both reach into TorchSharp internals by name; a version that renames them fails loudly here (and in the tests).
/// </summary>
internal static class CustomFunctions
{
    static readonly FieldInfo NodeField = typeof(autograd.AutogradContext).GetField("_node", BindingFlags.Instance | BindingFlags.NonPublic)
        ?? throw new MissingFieldException("TorchSharp AutogradContext._node (TorchSharp version changed?)");

    static readonly System.Collections.Concurrent.ConcurrentDictionary<Type, FieldInfo> CacheFields = new();
    [ThreadStatic] static autograd.AutogradContext? _lastContext;
    [ThreadStatic] static List<Tensor>? _savedWrappers;
    [ThreadStatic] static List<Tensor>? _handedOff; // per thread: backward runs on the thread that owns the device's work
    static long _released;

    /// <summary>Output caches freed so far (for tests: proves the reflection still finds TorchSharp's fields).</summary>
    public static long ReleasedOutputs => Interlocked.Read(ref _released);

    /// <summary>Call first in a custom function's forward: remembers the context for <see cref="AfterApply"/>.</summary>
    public static void Track(autograd.AutogradContext ctx)
    {
        ctx.set_materialize_grads(false);
        _lastContext = ctx;
    }

    /// <summary>
    /// save_for_backward for tensors made inside forward: TorchSharp turns the list into saved variables only after
    /// forward returns, so these must outlive forward's dispose scope; their wrappers are freed in <see cref="AfterApply"/>.
    /// </summary>
    public static void Save(autograd.AutogradContext ctx, params Tensor?[] tensors)
    {
        _savedWrappers ??= [];
        var kept = new List<Tensor>();
        foreach (var t in tensors)
        {
            var k = t?.alias().DetachFromDisposeScope();
            if (k is not null) _savedWrappers.Add(k);
            kept.Add(k!);
        }
        ctx.save_for_backward(kept);
    }

    /// <summary>
    /// Wrap every apply() in this: frees what the call just made no longer needs (the output-sized tensors TorchSharp
    /// cached, and the wrappers of <see cref="Save"/>) and returns apply()'s result.
    /// </summary>
    public static T AfterApply<T>(T result)
    {
        Release();
        return result;
    }

    static void Release()
    {
        if (_savedWrappers is { Count: > 0 } saved)
        {
            foreach (var t in saved) t.Dispose();
            saved.Clear();
        }
        var ctx = _lastContext;
        _lastContext = null;
        if (ctx is null) return;
        var node = NodeField.GetValue(ctx);
        if (node is null) return;
        var cacheField = CacheFields.GetOrAdd(node.GetType(), t => t.GetField("_outputCache", BindingFlags.Instance | BindingFlags.NonPublic)
            ?? throw new MissingFieldException("TorchSharp Node._outputCache (TorchSharp version changed?)"));
        if (cacheField.GetValue(node) is not List<Tensor> cache) return; // not executable: nothing cached
        for (int i = 0; i < cache.Count; i++)
        {
            if (cache[i] is null) continue;
            cache[i].Dispose();
            cache[i] = null!;
            Interlocked.Increment(ref _released);
        }
    }

    /// <summary>Returns a backward's gradients to libtorch and frees the previous call's wrappers.</summary>
    public static List<Tensor> HandOff(params Tensor?[] grads)
    {
        // Only this thread's previous call: another thread's grads may not have been copied by libtorch yet.
        if (_handedOff != null) foreach (var t in _handedOff) t.Dispose();
        _handedOff = grads.OfType<Tensor>().Select(t => t.DetachFromDisposeScope()).ToList();
        return grads.ToList()!;
    }
}
