namespace LoraKit.Cli.Commands;

/// <summary>The demo's task: route a customer request to one of four teams. Generated deterministically.</summary>
public static class DemoData
{
    public static readonly Dictionary<string, string[]> Intents = new()
    {
        ["accounts"] = ["reset my password", "change my email", "I cannot log in", "update my account settings", "delete my account", "my username is wrong", "unlock my account"],
        ["billing"] = ["my invoice is wrong", "I was charged twice", "refund my payment", "update my credit card", "the price on my bill is wrong", "cancel my subscription fee", "why is my invoice so high"],
        ["shipping"] = ["where is my package", "track my order", "the delivery is late", "change the shipping address", "the parcel never arrived", "when will my order ship", "my package went to the wrong city"],
        ["returns"] = ["return this item", "the product is broken", "exchange it for another size", "start a warranty claim", "send the item back", "the item arrived damaged", "I want to return my order"],
    };

    static readonly string[] Prefixes = ["", "hi,", "hello,", "hey team,", "good morning,", "quick question:", "urgent:", "can you help?", "please help,", "sorry to bother you,"];
    static readonly string[] Suffixes = ["", "please", "thanks", "today", "as soon as possible", "thank you", "right now", "if you can"];

    public static string Prompt(string request) => $"Request: {request}\nTeam:";

    /// <summary>
    /// (prompt, label) pairs. Every request phrase is wrapped in polite/urgent prefixes and suffixes; two thirds of the
    /// combinations train, and a sample of the rest — sentences the model never saw — is held out for evaluation.
    /// </summary>
    public static (List<(string prompt, string label)> train, List<(string prompt, string label)> valid) Build()
    {
        var train = new List<(string, string)>();
        var valid = new List<(string, string)>();
        foreach (var (label, phrases) in Intents)
            for (int p = 0; p < phrases.Length; p++)
                for (int i = 0; i < Prefixes.Length; i++)
                    for (int j = 0; j < Suffixes.Length; j++)
                    {
                        string text = string.Join(" ", new[] { Prefixes[i], phrases[p], Suffixes[j] }.Where(x => x.Length > 0));
                        int k = i + j + p;
                        if (k % 3 != 0) train.Add((Prompt(text), label));
                        else if (k % 4 == 0) valid.Add((Prompt(text), label));
                    }
        return (train, valid);
    }

    /// <summary>Routing rows as training pairs: the completion is the team after a space.</summary>
    public static IEnumerable<(string prompt, string completion)> Completions(IEnumerable<(string prompt, string label)> rows) =>
        rows.Select(r => (r.prompt, " " + r.label));

    /// <summary>Training pairs as prompt/completion JSONL.</summary>
    public static void WriteJsonl(string path, IEnumerable<(string prompt, string completion)> rows) =>
        File.WriteAllLines(path, rows.Select(r => DemoSkills.Line(new { prompt = r.prompt, completion = r.completion })));

    /// <summary>The task suite: the held-out requests, each answered with its team and nothing else.</summary>
    public static IEnumerable<string> TaskSuite(IEnumerable<(string prompt, string label)> valid) =>
        valid.Select((v, i) => DemoSkills.Line(new { id = $"route-{i + 1:000}", kind = "task", prompt = v.prompt, expect = new { equals = v.label }, max_tokens = 6 }));
}
