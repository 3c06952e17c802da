namespace LoraKit.Evaluation;

/// <summary>Parses suite JSONL (see the README's "Evaluation" section for the format).</summary>
internal static class SuiteReader
{
    public static EvalSuite Load(string path) => throw new NotImplementedException("helper 'suites' writes this");
}
