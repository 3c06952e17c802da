using System.Text.Json;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Models;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// A sequence-classification head on the causal LM, as transformers' *ForSequenceClassification: a bias-free linear
/// "score" layer (hidden → labels, fp32, trained alongside LoRA) applied to the last non-padding token's hidden state.
/// Saved PEFT-style inside the adapter (<c>base_model.model.score.weight</c>, config <c>modules_to_save</c>), with the
/// label names in <c>labels.json</c>.
/// </summary>
public sealed class SequenceClassifier : IDisposable
{
    public const string ScoreKey = "base_model.model.score.weight";
    public const string LabelsFile = "labels.json";

    public CausalLM Model { get; }
    public IReadOnlyList<string> Labels { get; }
    public Parameter Score { get; }

    /// <summary>Loads a trained classification adapter (LoRA + score head + labels) onto a base model.</summary>
    public static SequenceClassifier Load(Lora.LoraModel lm, string adapterDir)
    {
        Lora.AdapterFiles.Load(lm, "default", adapterDir);
        var labelsPath = Path.Combine(adapterDir, LabelsFile);
        if (!File.Exists(labelsPath)) throw new FileNotFoundException($"{adapterDir}: {LabelsFile} not found; not a classification adapter");
        var labels = JsonSerializer.Deserialize<List<string>>(File.ReadAllText(labelsPath))!;
        var clf = new SequenceClassifier(lm.Model, labels, 0);
        using var f = SafetensorsFile.Open(Path.Combine(adapterDir, Lora.AdapterFiles.WeightsFile));
        if (!f.Entries.TryGetValue(ScoreKey, out var e) || !e.Shape.SequenceEqual(new long[] { labels.Count, lm.Model.Config.HiddenSize }))
            throw new InvalidDataException($"{adapterDir}: no score head of shape [{labels.Count}, {lm.Model.Config.HiddenSize}]");
        using var _ = no_grad();
        using var w = f.Read(ScoreKey);
        clf.Score.copy_(w);
        return clf;
    }

    public SequenceClassifier(CausalLM model, IReadOnlyList<string> labels, long seed)
    {
        Model = model;
        Labels = labels;
        using var w = empty(labels.Count, model.Config.HiddenSize, ScalarType.Float32);
        w.normal_(0, 0.02, new Generator((ulong)seed + 7)); // transformers' default initializer_range
        Score = new Parameter(w.to(model.Device, copy: true), true);
    }

    /// <summary>Class logits [B, labels] (fp32) from the hidden state of each row's last real token.</summary>
    public Tensor Logits(Batch b)
    {
        using var scope = NewDisposeScope();
        var h = Model.model.Forward(b.InputIds, b.AttentionMask, null);
        var last = b.AttentionMask.sum(1) - 1;                                        // right padding
        var pooled = h[arange(h.shape[0], device: h.device), last].to(ScalarType.Float32);
        return nn.functional.linear(pooled, Score).MoveToOuterDisposeScope();
    }

    /// <summary>Summed cross-entropy over the batch (labels are the samples' single label index).</summary>
    public Tensor LossSum(Batch b, Tensor labels) =>
        nn.functional.cross_entropy(Logits(b), labels, reduction: nn.Reduction.Sum);

    /// <summary>Mean loss and accuracy over samples.</summary>
    public (double loss, double accuracy) Evaluate(IReadOnlyList<Sample> samples, int batchSize, int padId)
    {
        using var _ = no_grad();
        Model.eval();
        double loss = 0;
        long correct = 0;
        for (int i = 0; i < samples.Count; i += batchSize)
        {
            using var scope = NewDisposeScope();
            var rows = samples.Skip(i).Take(batchSize).ToList();
            using var batch = Batches.Collate(Inputs(rows), padId, Model.Device);
            var labels = LabelTensor(rows, Model.Device);
            var logits = Logits(batch);
            loss += nn.functional.cross_entropy(logits, labels, reduction: nn.Reduction.Sum).item<float>();
            correct += logits.argmax(1).eq(labels).sum().item<long>();
        }
        Model.train();
        return (loss / samples.Count, (double)correct / samples.Count);
    }

    /// <summary>Classification samples carry the label index in Labels[0]; the batch itself needs only the text.</summary>
    public static List<Sample> Inputs(IEnumerable<Sample> rows) =>
        rows.Select(r => r with { Labels = Enumerable.Repeat(Sample.IgnoreIndex, r.InputIds.Length).ToArray() }).ToList();

    public static Tensor LabelTensor(IEnumerable<Sample> rows, Device device) =>
        tensor(rows.Select(r => (long)r.Labels[0]).ToArray(), device: device);

    /// <summary>Adds the head to an adapter directory already written by <see cref="Lora.AdapterFiles.Save"/>.</summary>
    public void SaveInto(string adapterDir)
    {
        var weights = Path.Combine(adapterDir, Lora.AdapterFiles.WeightsFile);
        var all = new Dictionary<string, Tensor>();
        using (var f = SafetensorsFile.Open(weights))
            foreach (var k in f.Entries.Keys) all[k] = f.Read(k);
        all[ScoreKey] = Score;
        SafetensorsWriter.Save(weights, all, new Dictionary<string, string> { ["format"] = "pt" });
        foreach (var (k, t) in all) if (k != ScoreKey) t.Dispose();

        var configPath = Path.Combine(adapterDir, Lora.AdapterFiles.ConfigFile);
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(configPath))!.AsObject();
        config["task_type"] = "SEQ_CLS";
        config["modules_to_save"] = new System.Text.Json.Nodes.JsonArray("classifier", "score"); // what PEFT writes for SEQ_CLS
        File.WriteAllText(configPath, config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.WriteAllText(Path.Combine(adapterDir, LabelsFile), JsonSerializer.Serialize(Labels));
    }

    public void Dispose() => Score.Dispose();
}
