using System.Text.Json.Nodes;
using LoraKit.Data;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using LoraKit.Training;
using static TorchSharp.torch;

namespace LoraKit.Classification;

/// <summary>One text's prediction: the most probable label, every label's probability (softmax), and the raw logits.</summary>
public sealed record Prediction(string Label, IReadOnlyDictionary<string, double> Probabilities, float[] Logits);

/// <summary>
/// A sequence classifier ready to use: a base model with a SEQ_CLS adapter (LoRA + score head + labels) applied, or a
/// merged *ForSequenceClassification checkpoint. Loads in eval mode (no dropout), classifies in batches (no gradients,
/// one dispose scope per batch), and pools exactly as transformers does, so its logits match
/// AutoModelForSequenceClassification with the same weights. <see cref="SaveMerged"/> writes that checkpoint.
/// </summary>
public sealed class TextClassifier : IDisposable
{
    readonly LoraModel? _lora;

    public SequenceClassifier Head { get; }
    public Tokenizer Tokenizer { get; }
    public IReadOnlyList<string> Labels => Head.Labels;
    public CausalLM Model => Head.Model;

    TextClassifier(SequenceClassifier head, Tokenizer tok, LoraModel? lora)
    {
        Head = head; Tokenizer = tok; _lora = lora;
        Head.Model.eval();
    }

    /// <summary>
    /// Loads <paramref name="modelDir"/> with the classification adapter <paramref name="adapterDir"/>, or, when the
    /// adapter is null, a merged *ForSequenceClassification checkpoint.
    /// </summary>
    public static TextClassifier Load(string modelDir, string? adapterDir, ScalarType dtype, Device device)
    {
        if (!Directory.Exists(modelDir)) throw new DirectoryNotFoundException($"model directory '{modelDir}' does not exist");
        bool merged = IsSequenceClassificationCheckpoint(modelDir);
        if (adapterDir is null)
        {
            if (!merged) throw new LoraKitException($"{modelDir} is a causal LM, not a sequence-classification checkpoint; give a classification adapter to apply to it");
            return LoadMerged(modelDir, dtype, device);
        }
        if (merged) throw new LoraKitException($"{modelDir} is already a sequence classifier (a merged checkpoint); use it without an adapter");
        // Check the adapter's task before the (large) base model is loaded.
        if (!Directory.Exists(adapterDir)) throw new DirectoryNotFoundException($"adapter directory '{adapterDir}' does not exist");
        var task = AdapterFiles.Task(adapterDir);
        if (!task.IsSequenceClassification) throw AdapterTask.NotForClassification(adapterDir, task);
        var tok = Tokenizer.Load(modelDir);
        var lm = new LoraModel(CausalLM.Load(modelDir, dtype, device));
        try
        {
            var head = SequenceClassifier.Load(lm, adapterDir, SequenceClassifier.PadFor(tok, lm.Model.Config));
            return new TextClassifier(head, tok, lm);
        }
        catch { lm.Dispose(); throw; }
    }

    /// <summary>True when config.json names a *ForSequenceClassification architecture.</summary>
    public static bool IsSequenceClassificationCheckpoint(string dir)
    {
        var path = Path.Combine(dir, "config.json");
        if (!File.Exists(path)) return false;
        try
        {
            return JsonNode.Parse(IO.JsonFiles.ReadText(path)) is JsonObject o && o["architectures"] is JsonArray { Count: > 0 } a
                && a[0] is JsonValue v && v.TryGetValue<string>(out var arch) && arch.EndsWith(SeqClsSuffix, StringComparison.Ordinal);
        }
        catch (Exception e) when (e is System.Text.Json.JsonException or LoraKitException) { return false; } // ModelConfig.Load reports it properly
    }

    const string SeqClsSuffix = "ForSequenceClassification";
    const string CausalSuffix = "ForCausalLM";

    /// <summary>
    /// Loads a merged *ForSequenceClassification checkpoint: the decoder as LoraKit's causal LM family (strict
    /// name-for-name), score.weight as the head, labels from id2label, pooling on config.pad_token_id.
    /// </summary>
    static TextClassifier LoadMerged(string dir, ScalarType dtype, Device device)
    {
        var path = Path.Combine(dir, "config.json");
        var raw = (JsonObject)JsonNode.Parse(IO.JsonFiles.ReadText(path))!;
        string arch = raw["architectures"]![0]!.GetValue<string>();
        var asCausal = (JsonObject)raw.DeepClone();
        asCausal["architectures"] = new JsonArray(arch[..^SeqClsSuffix.Length] + CausalSuffix);
        var config = ModelConfig.Parse(asCausal, path) with { TieWordEmbeddings = true }; // no LM head: nothing to load for it
        var labels = Id2Label(raw["id2label"], path);
        var tok = Tokenizer.Load(dir);
        using var files = CheckpointFiles.Open(dir);
        if (!files.Contains("score.weight")) throw new ModelConfigException(path, "the checkpoint has no score.weight (the classification head)");
        var shape = files.Entry("score.weight").Shape;
        if (!shape.SequenceEqual(new long[] { labels.Count, config.HiddenSize }))
            throw new ModelConfigException(path, $"score.weight has shape [{string.Join(", ", shape)}], but id2label ({labels.Count} labels) and hidden_size {config.HiddenSize} need [{labels.Count}, {config.HiddenSize}]");
        using var _ = no_grad();
        var model = new CausalLM(config, new CheckpointWeights(files, dtype, device, ["score.weight", "lm_head.weight"]));
        var head = new SequenceClassifier(model, labels, 0) { PadTokenId = config.PadTokenId };
        using (var w = files.Read("score.weight", ScalarType.Float32, device)) head.Score.copy_(w);
        return new TextClassifier(head, tok, null);
    }

    static List<string> Id2Label(JsonNode? node, string path)
    {
        if (node is not JsonObject o || o.Count < 2 || o.Count > AdapterFiles.MaxLabels)
            throw new ModelConfigException(path, "id2label must map 0…n−1 (n ≥ 2) to label names");
        var labels = new string[o.Count];
        foreach (var (k, v) in o)
        {
            if (!int.TryParse(k, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int i) || i >= labels.Length || labels[i] != null
                || v is not JsonValue jv || !jv.TryGetValue<string>(out var name) || name.Length == 0)
                throw new ModelConfigException(path, $"id2label entry '{k}' is not one of 0…{labels.Length - 1} mapped to a non-empty name");
            labels[i] = name;
        }
        if (labels.Distinct().Count() != labels.Length) throw new ModelConfigException(path, "id2label names a label twice");
        return labels.ToList();
    }

    /// <summary>Tokenises one text as training did (special tokens added); empty or over-long texts are refused.</summary>
    public int[] Encode(string text)
    {
        if (text.Length == 0) throw new DataException("the text is empty");
        int limit = Model.Config.MaxPositionEmbeddings;
        // No token spans 1,024 characters, so a text this long is over the limit without tokenising it (bounded time).
        if ((long)text.Length > 1024L * limit) throw new DataException($"the text has {text.Length} characters, far past the model's limit of {limit} tokens");
        var ids = Tokenizer.Encode(text);
        if (ids.Length == 0) throw new DataException("the text encodes to no tokens");
        if (ids.Length > limit) throw new DataException($"the text has {ids.Length} tokens; the model's limit (max_position_embeddings) is {limit}");
        return ids;
    }

    /// <summary>Classifies texts, <paramref name="batchSize"/> at a time. Every text is checked before any is run.</summary>
    public List<Prediction> Classify(IReadOnlyList<string> texts, int batchSize = 8) =>
        ClassifyIds(texts.Select(Encode).ToList(), batchSize);

    /// <summary>Classifies token-id sequences (already checked by <see cref="Encode"/>), <paramref name="batchSize"/> at a time.</summary>
    public List<Prediction> ClassifyIds(IReadOnlyList<int[]> ids, int batchSize = 8)
    {
        if (batchSize < 1) throw new ArgumentException("the batch size must be at least 1");
        var result = new List<Prediction>(ids.Count);
        using var _ = no_grad();
        int padId = Head.PadTokenId ?? 0;
        for (int i = 0; i < ids.Count; i += batchSize)
        {
            using var scope = NewDisposeScope();
            var rows = ids.Skip(i).Take(batchSize).Select((x, j) => new Sample(x, x, i + j)).ToList();
            using var batch = Batches.Collate(rows, padId, Model.Device);
            var logits = Head.Logits(batch).cpu();
            var probs = logits.softmax(1);
            for (int r = 0; r < rows.Count; r++)
            {
                var l = logits[r].data<float>().ToArray();
                var p = probs[r].data<float>().ToArray();
                var map = new Dictionary<string, double>(Labels.Count);
                for (int k = 0; k < Labels.Count; k++) map[Labels[k]] = p[k];
                result.Add(new Prediction(Labels[Array.IndexOf(l, l.Max())], map, l));
            }
        }
        return result;
    }

    /// <summary>
    /// Merges the adapter into the base weights and writes a *ForSequenceClassification checkpoint transformers loads:
    /// the architecture renamed, id2label/label2id, pad_token_id (what pooling used), score.weight in place of lm_head.
    /// </summary>
    public void SaveMerged(string sourceDir, string outDir, JsonObject? provenance = null)
    {
        if (_lora is null) throw new InvalidOperationException("this classifier is already a merged checkpoint");
        _lora.Merge("default");
        var id2label = new JsonObject();
        var label2id = new JsonObject();
        for (int i = 0; i < Labels.Count; i++) { id2label[i.ToString(System.Globalization.CultureInfo.InvariantCulture)] = Labels[i]; label2id[Labels[i]] = i; }
        string arch = Model.Config.Architecture[..^CausalSuffix.Length] + SeqClsSuffix;
        using var score = Head.Score.detach().to(Model.DType);
        MergedCheckpoint.Save(_lora, sourceDir, outDir, editConfig: c =>
        {
            c["architectures"] = new JsonArray(arch);
            c["id2label"] = id2label;
            c["label2id"] = label2id;
            c["pad_token_id"] = Head.PadTokenId;
            c["problem_type"] = "single_label_classification";
            if (provenance is not null) c[MergedCheckpoint.ProvenanceKey] = provenance.DeepClone();
        }, head: new Dictionary<string, Tensor> { ["score.weight"] = score });
    }

    public void Dispose()
    {
        Head.Dispose();
        if (_lora != null) _lora.Dispose(); else Head.Model.Dispose();
    }
}
