using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraKit.Training;

/// <summary>
/// A sequence-classification head on the causal LM, as transformers' *ForSequenceClassification: a bias-free linear
/// "score" layer (hidden → labels, fp32, trained alongside LoRA) applied to the hidden state of each row's last token
/// that is not the pad token (transformers' pooling; without a pad token, the last real token). Saved PEFT-style inside
/// the adapter (<c>base_model.model.score.weight</c>, config task_type SEQ_CLS with <c>modules_to_save</c>), with the
/// label names in <c>labels.json</c> (PEFT ignores that file and loads the adapter as it is).
/// </summary>
public sealed class SequenceClassifier : IDisposable
{
    public const string ScoreKey = AdapterFiles.ScoreKey;
    public const string LabelsFile = AdapterFiles.LabelsFile;

    public CausalLM Model { get; }
    public IReadOnlyList<string> Labels { get; }
    public Parameter Score { get; }
    /// <summary>Pooling skips trailing tokens with this id, as transformers does with config.pad_token_id; null: none.</summary>
    public int? PadTokenId { get; init; }

    /// <summary>The pad id classification pools with: the tokenizer's pad token, else the model config's pad_token_id.</summary>
    public static int? PadFor(Tokenizer tok, ModelConfig config) =>
        tok.Config.PadToken is string pt && tok.TokenToId(pt) is int id ? id : config.PadTokenId;

    /// <summary>
    /// Loads a sequence-classification adapter (LoRA + score head + labels) onto a base model; a causal-LM adapter is
    /// refused with a clear error.
    /// </summary>
    public static SequenceClassifier Load(LoraModel lm, string adapterDir, int? padTokenId = null)
    {
        var (labels, head) = ReadHead(adapterDir, lm.Model.Config.HiddenSize);
        using (head)
        {
            AdapterFiles.Load(lm, "default", adapterDir, new AdapterLoadOptions { SequenceClassification = true });
            var clf = new SequenceClassifier(lm.Model, labels, 0) { PadTokenId = padTokenId };
            using var _ = no_grad();
            clf.Score.copy_(head);
            return clf;
        }
    }

    /// <summary>
    /// Reads and checks a SEQ_CLS adapter's labels and score head ([labels, hidden], finite; fp32 on the CPU) without
    /// touching a model; a causal-LM adapter is refused.
    /// </summary>
    public static (IReadOnlyList<string> labels, Tensor score) ReadHead(string adapterDir, long hidden)
    {
        if (!Directory.Exists(adapterDir)) throw new DirectoryNotFoundException($"adapter directory '{adapterDir}' does not exist");
        var task = AdapterFiles.Task(adapterDir);
        if (!task.IsSequenceClassification) throw AdapterTask.NotForClassification(adapterDir, task);
        var labels = task.Labels!;
        var weights = Path.Combine(adapterDir, AdapterFiles.WeightsFile);
        using var f = SafetensorsFile.Open(weights);
        if (!f.Entries.TryGetValue(ScoreKey, out var e))
            throw new LoraConfigException($"{weights}: no score head '{ScoreKey}' (a SEQ_CLS adapter needs one)");
        if (!e.Shape.SequenceEqual(new[] { labels.Count, hidden }))
            throw new LoraConfigException($"{weights}: the score head has shape [{string.Join(", ", e.Shape)}], but {labels.Count} labels " +
                $"and this base model (hidden size {hidden}) need [{labels.Count}, {hidden}]");
        foreach (var k in f.Entries.Keys)
            if (k.StartsWith("base_model.model.score.", StringComparison.Ordinal) && k != ScoreKey)
                throw new LoraConfigException($"{weights}: '{k}' is not supported (the score head is one bias-free weight)");
        using var _ = no_grad();
        using var raw = f.Read(ScoreKey);
        var head = raw.to(ScalarType.Float32, copy: true).DetachFromDisposeScope();
        if (!head.isfinite().all().item<bool>()) { head.Dispose(); throw new LoraConfigException($"{weights}: the score head has non-finite values"); }
        return (labels, head);
    }

    public SequenceClassifier(CausalLM model, IReadOnlyList<string> labels, long seed)
    {
        Model = model;
        Labels = labels;
        using var w = empty(labels.Count, model.Config.HiddenSize, ScalarType.Float32);
        w.normal_(0, 0.02, new Generator((ulong)seed + 7)); // transformers' default initializer_range
        Score = new Parameter(w.to(model.Device, copy: true), true);
    }

    /// <summary>Class logits [B, labels] (fp32) from the pooled hidden states.</summary>
    public Tensor Logits(Batch b)
    {
        using var scope = NewDisposeScope();
        var h = Model.model.Forward(b.InputIds, b.AttentionMask, null);
        var pooled = Pool(h, b.InputIds, b.AttentionMask, PadTokenId).to(ScalarType.Float32);
        return nn.functional.linear(pooled, Score).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// transformers' pooling: per row the hidden state at the rightmost position whose token is not the pad token (the
    /// index argmax(arange(T) · nonpad), so a row of pads pools position 0); padding (mask 0) never counts. Without a pad
    /// token, the last real token (what transformers does for a single unpadded row).
    /// </summary>
    public static Tensor Pool(Tensor hidden, Tensor ids, Tensor mask, int? padTokenId)
    {
        using var scope = NewDisposeScope();
        var real = mask.to(ScalarType.Bool);
        if (padTokenId is int pad) real = real.logical_and(ids.NotEqual(pad));
        var index = (ScalarOps.Range(ids.shape[1], ids.device).unsqueeze(0) * real.to(ScalarType.Int64)).argmax(1);
        return hidden[ScalarOps.Range(hidden.shape[0], hidden.device), index].MoveToOuterDisposeScope();
    }

    /// <summary>Summed cross-entropy over the batch (labels are the samples' single label index).</summary>
    public Tensor LossSum(Batch b, Tensor labels) =>
        nn.functional.cross_entropy(Logits(b), labels, reduction: nn.Reduction.Sum);

    /// <summary>Mean loss and accuracy over samples.</summary>
    public (double loss, double accuracy) Evaluate(IReadOnlyList<Sample> samples, int batchSize, int padId)
    {
        using var _ = no_grad();
        bool wasTraining = Model.training;
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
        if (wasTraining) Model.train();
        return (loss / samples.Count, (double)correct / samples.Count);
    }

    /// <summary>Classification samples carry the label index in Labels[0]; the batch itself needs only the text.</summary>
    public static List<Sample> Inputs(IEnumerable<Sample> rows) =>
        rows.Select(r => r with { Labels = Enumerable.Repeat(Sample.IgnoreIndex, r.InputIds.Length).ToArray() }).ToList();

    public static Tensor LabelTensor(IEnumerable<Sample> rows, Device device) =>
        tensor(rows.Select(r => (long)r.Labels[0]).ToArray(), device: device);

    /// <summary>Adds the head to an adapter directory already written by <see cref="AdapterFiles.Save"/>.</summary>
    public void SaveInto(string adapterDir)
    {
        var weights = Path.Combine(adapterDir, AdapterFiles.WeightsFile);
        var all = new Dictionary<string, Tensor>();
        using (var f = SafetensorsFile.Open(weights))
            foreach (var k in f.Entries.Keys) all[k] = f.Read(k);
        all[ScoreKey] = Score;
        SafetensorsWriter.Save(weights, all, new Dictionary<string, string> { ["format"] = "pt" });
        foreach (var (k, t) in all) if (k != ScoreKey) t.Dispose();

        var configPath = Path.Combine(adapterDir, AdapterFiles.ConfigFile);
        var config = System.Text.Json.Nodes.JsonNode.Parse(IO.JsonFiles.ReadText(configPath))!.AsObject();
        config["task_type"] = "SEQ_CLS";
        config["modules_to_save"] = new System.Text.Json.Nodes.JsonArray("classifier", "score"); // what PEFT writes for SEQ_CLS
        File.WriteAllText(configPath, config.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
        File.WriteAllText(Path.Combine(adapterDir, LabelsFile), System.Text.Json.JsonSerializer.Serialize(Labels));
    }

    public void Dispose() => Score.Dispose();
}
