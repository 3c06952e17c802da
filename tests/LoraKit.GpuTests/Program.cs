using System.Diagnostics;
using System.Reflection;
using LoraKit.Tests;

// Runs the [CudaFact]/[CudaTheory] tests compiled into this program (tests/LoraKit.Tests/Gpu) one after another, each
// theory once per [InlineData], and prints one line per test: ok, FAIL (with the assertion's message) or skip.
// Arguments: substrings of test names to run (none: all). Exit code 1 when a test failed or none ran.
var filters = args;
int passed = 0, failed = 0, skipped = 0;
var tests = typeof(CudaTests).Assembly.GetTypes()
    .SelectMany(t => t.GetMethods(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static).Select(m => (Type: t, Method: m)))
    .Where(x => x.Method.GetCustomAttribute<FactAttribute>() is CudaFactAttribute or CudaTheoryAttribute)
    .OrderBy(x => x.Type.FullName).ThenBy(x => x.Method.MetadataToken);
foreach (var (type, method) in tests)
{
    var fact = method.GetCustomAttribute<FactAttribute>()!;
    var cases = method.GetCustomAttributes<InlineDataAttribute>().SelectMany(d => d.GetData(method)).ToList();
    if (cases.Count == 0) cases.Add([]);
    foreach (var arguments in cases)
    {
        string name = $"{type.Name}.{method.Name}" + (arguments.Length > 0 ? $"({string.Join(", ", arguments)})" : "");
        if (filters.Length > 0 && !filters.Any(f => name.Contains(f, StringComparison.OrdinalIgnoreCase))) continue;
        if (fact.Skip is { } why)
        {
            Console.WriteLine($"skip {name}: {why}");
            skipped++;
            continue;
        }
        var clock = Stopwatch.StartNew();
        try
        {
            var target = method.IsStatic ? null : Activator.CreateInstance(type);
            if (method.Invoke(target, arguments) is Task task) task.GetAwaiter().GetResult();
            (target as IDisposable)?.Dispose();
            Console.WriteLine($"ok   {name} ({clock.Elapsed.TotalSeconds:F1} s)");
            passed++;
        }
        catch (Exception e)
        {
            var cause = e is TargetInvocationException { InnerException: { } inner } ? inner : e;
            Console.WriteLine($"FAIL {name} ({clock.Elapsed.TotalSeconds:F1} s): {cause.GetType().Name}: {cause.Message}");
            failed++;
        }
    }
}
Console.WriteLine($"GPU tests: {passed} passed, {failed} failed, {skipped} skipped");
return failed > 0 || passed == 0 ? 1 : 0;
