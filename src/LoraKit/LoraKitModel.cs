using LoraKit.Generation;
using LoraKit.Hub;
using LoraKit.IO;
using LoraKit.Lora;
using LoraKit.Training;
using LoraKit.Models;
using LoraKit.Runtime;
using LoraKit.Serving;
using LoraKit.Tokenization;
using Microsoft.Extensions.AI;
using static TorchSharp.torch;

namespace LoraKit;

/// <summary>
/// The library's entry point: a Hugging Face causal LM with everything needed to use it, loaded together by
/// <see cref="FromPretrained"/> (as ML.NET GenAI's <c>FromPretrained</c> and transformers' pipeline do): the weights in
/// evaluation mode, the tokenizer, the chat template and the stop ids of generation_config.json (see
/// <see cref="StopTokens"/>). Generate from a prompt or a conversation, score a text, load PEFT adapters, train one with
/// <see cref="Training.Trainer"/>, or serve it as a Microsoft.Extensions.AI <see cref="IChatClient"/>.
/// Not thread-safe: one caller at a time (the chat client serialises its requests on a thread of its own).
/// </summary>
public sealed class LoraKitModel : IDisposable
{
    OwnedChatClient? _client;

    LoraKitModel(string? directory, LoraModel lora, Tokenizer tokenizer, int[] eos)
    {
        Directory = directory;
        Lora = lora;
        Tokenizer = tokenizer;
        EosTokenIds = eos;
        ChatTemplate = ChatTemplate.Of(tokenizer);
    }

    /// <summary>
    /// Loads the model in <paramref name="modelDir"/> (config.json, safetensors, tokenizer.json; generation_config.json
    /// when present) on <paramref name="device"/> ("auto", "cpu", "cuda", "cuda:N") in <paramref name="dtype"/>
    /// ("fp32", "bf16", "fp16"; default bf16 on CUDA, fp32 on the CPU), in evaluation mode. With
    /// <paramref name="quantize"/> the base's linear layers are quantized as they load and stay packed (QLoRA; the
    /// compute dtype is <paramref name="dtype"/>); a pre-quantized bitsandbytes checkpoint loads packed without it.
    /// <paramref name="modelDir"/> may be a Hugging Face hub id <c>ORG/NAME[@REVISION]</c> instead (when no such local
    /// folder exists): its config, tokenizer and safetensors files are downloaded into the hub cache shared with
    /// <c>huggingface_hub</c> (<paramref name="hub"/>, default <see cref="HubSettings.FromEnvironment"/>: HF_HOME,
    /// HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) and loaded from its snapshot folder.
    /// </summary>
    public static LoraKitModel FromPretrained(string modelDir, string device = "auto", string? dtype = null, Quantization.BnbQuantizeOptions? quantize = null,
        HubSettings? hub = null)
    {
        modelDir = HubDownloader.ResolveLocalOrHub(modelDir, HubFileSet.Model, hub);
        ModelDirectory.Require(modelDir);
        if (Classification.TextClassifier.IsSequenceClassificationCheckpoint(modelDir))
            throw new LoraKitException($"{modelDir} is a sequence-classification checkpoint (a merged classifier), not a causal LM; load it with TextClassifier");
        var (dev, type) = Runtime.Placement.Resolve(device, dtype);
        var tokenizer = Tokenizer.Load(modelDir);
        var model = CausalLM.Load(modelDir, type, dev, quantize);
        return new LoraKitModel(modelDir, new LoraModel(model), tokenizer, StopTokens.EosTokenIds(model.Config, tokenizer, modelDir));
    }

    /// <summary>The directory the model was loaded from.</summary>
    public string? Directory { get; }
    /// <summary>The network (HF module tree; <c>Lora</c> holds the same one with its adapters).</summary>
    public CausalLM Model => Lora.Model;
    /// <summary>The model with its LoRA adapters (loaded, trained, active).</summary>
    public LoraModel Lora { get; }
    /// <summary>The model's tokenizer (tokenizer.json + tokenizer_config.json).</summary>
    public Tokenizer Tokenizer { get; }
    /// <summary>The chat template of tokenizer_config.json, or null when the model has none.</summary>
    public ChatTemplate? ChatTemplate { get; }
    /// <summary>The ids that end generation (generation_config.json's eos_token_id and the tokenizer's EOS).</summary>
    public IReadOnlyCollection<int> EosTokenIds { get; }
    /// <summary>Where the model runs.</summary>
    public Device Device => Model.Device;
    /// <summary>The adapter generation uses (null: the base model alone).</summary>
    public string? ActiveAdapter { get; private set; }

    /// <summary>
    /// Loads the PEFT adapter in <paramref name="adapterDir"/> under <paramref name="name"/> and makes it the active
    /// one; returns this model, so <c>LoraKitModel.FromPretrained(dir).WithAdapter(adapter)</c> reads as one step.
    /// A hub id <c>ORG/NAME[@REVISION]</c> (when no such local folder exists) is downloaded into the hub cache first.
    /// </summary>
    public LoraKitModel WithAdapter(string adapterDir, string name = Training.Trainer.AdapterName, AdapterLoadOptions? options = null)
    {
        NoChatClient();
        adapterDir = HubDownloader.ResolveLocalOrHub(adapterDir, HubFileSet.Adapter);
        AdapterFiles.Load(Lora, name, adapterDir, options);
        UseAdapter(name);
        return this;
    }

    /// <summary>Makes the loaded adapter <paramref name="name"/> the one generation uses; null: the base model alone.</summary>
    public void UseAdapter(string? name)
    {
        NoChatClient();
        Lora.SetDisabled(name is null);
        if (name is not null) Lora.SetActive(name);
        ActiveAdapter = name;
    }

    /// <summary>
    /// A trainer of a fresh LoRA adapter <paramref name="adapterName"/> on this model over in-memory
    /// <paramref name="examples"/> (see <see cref="Trainer"/>'s constructor); the adapter becomes the active one, so
    /// <see cref="Generate(string, SamplingOptions?, Action{string}?)"/> uses it as it trains.
    /// </summary>
    public Trainer CreateTrainer(IEnumerable<TrainingExample> examples, LoraConfig? lora = null, TrainConfig? options = null,
        string adapterName = "default")
    {
        NoChatClient();
        var trainer = new Trainer(Lora, Tokenizer, examples, lora, options, adapterName, Directory);
        ActiveAdapter = adapterName;
        return trainer;
    }

    /// <summary>A conversation rendered by the model's chat template, ready to encode (no special tokens to add).</summary>
    public string RenderChat(IEnumerable<ChatTurn> turns, bool addGenerationPrompt = true) =>
        (ChatTemplate ?? throw new LoraKitException($"{Directory}: the model has no chat template (tokenizer_config.json 'chat_template')"))
            .Render(turns, addGenerationPrompt, Tokenizer.Config);

    /// <summary>
    /// Continues <paramref name="prompt"/> (encoded with the tokenizer's special tokens, e.g. BOS). Without
    /// <paramref name="options"/> decoding is greedy up to 64 new tokens; options without EOS ids stop at the model's
    /// (<see cref="EosTokenIds"/>). <paramref name="onText"/> receives each new piece of text as it is decoded.
    /// </summary>
    public GenerationResult Generate(string prompt, SamplingOptions? options = null, Action<string>? onText = null) =>
        Generate(Tokenizer.Encode(prompt), options, onText);

    /// <summary>The assistant's reply to a conversation, through the model's chat template (see the string overload for the options).</summary>
    public GenerationResult Generate(IEnumerable<ChatTurn> conversation, SamplingOptions? options = null, Action<string>? onText = null) =>
        Generate(Tokenizer.Encode(RenderChat(conversation), addSpecialTokens: false), options, onText);

    GenerationResult Generate(int[] promptIds, SamplingOptions? options, Action<string>? onText)
    {
        NoChatClient();
        options ??= new SamplingOptions();
        if (options.EosTokenIds.Count == 0) options = options with { EosTokenIds = EosTokenIds };
        Model.eval(); // a trainer may have left it in training mode: no dropout while generating
        return new TextGenerator(Model, Tokenizer).Generate(promptIds, options, onText);
    }

    /// <summary>Mean next-token negative log-likelihood of <paramref name="text"/> (fp32, as transformers' loss), with the active adapter.</summary>
    public double Loss(string text)
    {
        NoChatClient();
        var ids = Tokenizer.Encode(text);
        if (ids.Length < 2) throw new LoraKitException("the text must encode to at least two tokens to have a next-token loss");
        Model.eval();
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var input = tensor(ids.Select(x => (long)x).ToArray(), device: Device).unsqueeze(0);
        return Model.Loss(input).item<float>();
    }

    /// <summary>
    /// Evaluates the base and each adapter in <paramref name="adapterDirs"/> on <paramref name="suites"/>
    /// (<see cref="Evaluation.EvalSuite.Load"/>): the same cases, base weights loaded once, generation batched, the gate's
    /// verdict per adapter (see <see cref="Evaluation.SuiteEvaluation"/>). Adapters loaded on this model before are left
    /// as they are, but the active one is the base afterwards.
    /// </summary>
    public Evaluation.EvalReport Evaluate(IReadOnlyList<Evaluation.EvalSuite> suites, IReadOnlyList<string>? adapterDirs = null,
        Evaluation.EvalOptions? options = null)
    {
        NoChatClient();
        if (Directory is null) throw new LoraKitException("the model was not loaded from a directory; evaluation records the base it ran on");
        try { return Evaluation.SuiteEvaluation.Run(Lora, Tokenizer, ChatTemplate, EosTokenIds, Directory, adapterDirs ?? [], suites, options); }
        finally { UseAdapter(null); }
    }

    /// <summary>
    /// The model as a Microsoft.Extensions.AI chat client: the chat template renders the messages, generation stops at
    /// the model's EOS ids, <c>ChatOptions.ModelId</c> picks a loaded adapter ("base": none; unset: the active one).
    /// Requests are batched on a thread of the client's own; until it is disposed, use the model only through it.
    /// </summary>
    public IChatClient AsChatClient(int maxBatch = 8)
    {
        NoChatClient();
        if (ChatTemplate is null) throw new LoraKitException($"{Directory}: the model has no chat template (tokenizer_config.json 'chat_template')");
        var engine = new InferenceEngine(Lora, Tokenizer, maxBatch);
        _client = new OwnedChatClient(new LoraKitChatClient(engine, null, EosTokenIds, ActiveAdapter), () =>
        {
            engine.Dispose();
            Lora.SetRowAdapters(null); // the engine leaves per-row adapters set; generation here uses the active one
            _client = null;
        });
        return _client;
    }

    void NoChatClient()
    {
        if (_client is not null) throw new InvalidOperationException("the model is being served by its chat client; dispose the client first");
    }

    /// <summary>Frees the model (and stops its chat client, if one is running).</summary>
    public void Dispose()
    {
        _client?.Dispose();
        Lora.Dispose();
    }

    /// <summary>A chat client that gives the model back when disposed (stops the engine thread).</summary>
    sealed class OwnedChatClient(IChatClient inner, Action release) : DelegatingChatClient(inner)
    {
        bool _released;

        protected override void Dispose(bool disposing)
        {
            if (disposing && !_released)
            {
                _released = true;
                release();
            }
            base.Dispose(disposing);
        }
    }
}
