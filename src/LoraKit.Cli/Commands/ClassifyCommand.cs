using System.CommandLine;
using LoraKit.Classification;
using LoraKit.Runtime;

namespace LoraKit.Cli.Commands;

/// <summary>
/// <c>lorakit classify</c>: label + probabilities for a text or a JSONL file with a sequence-classification adapter (or a
/// merged *ForSequenceClassification checkpoint); on labelled data also accuracy and the confusion matrix.
/// </summary>
public static class ClassifyCommand
{
    public static Command Build()
    {
        var model = new Option<string>("--model") { Description = "base model directory (or a merged *ForSequenceClassification checkpoint)", Required = true };
        var adapter = new Option<string?>("--adapter") { Description = "sequence-classification adapter directory (from `lorakit train` on {\"text\",\"label\"} data)" };
        var text = new Option<string?>("--text") { Description = "one text to classify" };
        var data = new Option<string?>("--data") { Description = "JSONL file of {\"text\"} or {\"text\",\"label\"} lines (labelled: accuracy and confusion matrix)" };
        var batch = new Option<int>("--batch-size") { Description = "texts per forward pass", DefaultValueFactory = _ => 8 };
        var device = new Option<string>("--device") { Description = "auto, cpu or cuda", DefaultValueFactory = _ => "auto" };
        var dtype = new Option<string?>("--dtype") { Description = "fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)" };
        var json = new Option<bool>("--json") { Description = "print one JSON object (labels, predictions with probabilities and logits, accuracy, confusion)" };
        var cmd = new Command("classify", "Classify texts with a sequence-classification adapter: label and probabilities; accuracy and a confusion matrix on labelled data.");
        foreach (var o in new Option[] { model, adapter, text, data, batch, device, dtype, json }) cmd.Options.Add(o);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            string? t = r.GetValue(text), d = r.GetValue(data);
            if ((t is null) == (d is null)) throw new ArgumentException("give exactly one of --text or --data");
            if (r.GetValue(batch) < 1) throw new ArgumentException("--batch-size must be at least 1");
            if (d is not null && !File.Exists(d)) throw new FileNotFoundException($"{d}: file not found");
            var (dev, dt) = Placement.Resolve(r.GetValue(device)!, r.GetValue(dtype));
            using var clf = TextClassifier.Load(ModelArgument.Resolve(r.GetValue(model)!), r.GetValue(adapter), dt, dev);

            var rows = d is null ? [new LabelledText(0, t!, null)] : ClassificationData.Read(d, clf.Labels);
            var ids = d is null ? [Encode(clf, t!)] : ClassificationData.Encode(clf, d, rows);
            var predictions = clf.ClassifyIds(ids, r.GetValue(batch));
            var labelled = rows.All(x => x.Label is not null);
            var report = labelled
                ? ClassificationReport.Of(clf.Labels, rows.Select(x => x.Label!.Value).ToList(), predictions.Select(p => IndexOf(clf.Labels, p.Label)).ToList())
                : null;

            if (r.GetValue(json))
            {
                Console.WriteLine(CliJson.Serialize(new
                {
                    labels = clf.Labels,
                    pad_token_id = clf.Head.PadTokenId,
                    predictions = predictions.Select((p, i) => new { index = i, line = d is null ? (int?)null : rows[i].Line, label = p.Label, probabilities = p.Probabilities, logits = p.Logits }),
                    accuracy = report?.Accuracy,
                    confusion = report?.Confusion,
                }));
                return 0;
            }
            if (d is null || report is null)
                for (int i = 0; i < predictions.Count; i++)
                    Console.WriteLine((d is null ? "" : $"line {rows[i].Line}: ") + $"{predictions[i].Label}  (" +
                        string.Join(", ", predictions[i].Probabilities.OrderByDescending(kv => kv.Value).Select(kv => $"{kv.Key} {kv.Value:F4}")) + ")");
            if (report is not null) Print(report);
            return 0;
        }));
        return cmd;
    }

    static int[] Encode(TextClassifier clf, string text)
    {
        try { return clf.Encode(text); }
        catch (Data.DataException e) { throw new Data.DataException($"--text: {e.Message}"); }
    }

    static int IndexOf(IReadOnlyList<string> labels, string label)
    {
        for (int i = 0; i < labels.Count; i++) if (labels[i] == label) return i;
        return -1;
    }

    static void Print(ClassificationReport r)
    {
        Console.WriteLine($"accuracy: {r.Accuracy:F4} ({r.Correct}/{r.Total})");
        Console.WriteLine("confusion matrix (rows: true label, columns: predicted):");
        int w = Math.Max(6, r.Labels.Max(l => l.Length) + 2);
        Console.WriteLine(new string(' ', w) + string.Concat(r.Labels.Select(l => l.PadLeft(w))));
        for (int i = 0; i < r.Labels.Count; i++)
            Console.WriteLine(r.Labels[i].PadRight(w) + string.Concat(r.Confusion[i].Select(c => c.ToString(System.Globalization.CultureInfo.InvariantCulture).PadLeft(w))));
    }
}
