using System.Diagnostics;
using System.Threading.Channels;
using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Serving.Paged;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Serving;

/// <summary>
/// One base model, many adapters, continuous batching over a paged KV cache (vLLM's design, in C#). A single worker
/// thread owns the model (TorchSharp models are not shared across threads); requests wait in a channel and the
/// <see cref="Scheduler"/> fills each step under a token budget: one token for every decoding sequence, then prefill
/// chunks of new or partly prefilled prompts. The step's tokens run packed in one row through the model, each token's
/// LoRA term computed with its sequence's adapter (base tokens get none), and attention reads each sequence's own KV
/// blocks (<see cref="PagedAttention"/>). Sequences join and leave without touching anyone else's cache.
/// Detokenization and streaming run on other threads (<see cref="TextStreamer"/>) unless a request has stop strings,
/// which need the text to decide when to stop. Adapter loads and unloads run on the engine thread between steps.
/// </summary>
public sealed class InferenceEngine : IDisposable
{
    abstract record Work;
    sealed record GenerateWork(EngineRequest Request) : Work;
    sealed record ActionWork(Func<object?> Run, TaskCompletionSource<object?> Done) : Work;

    readonly LoraModel _lm;
    readonly Tokenizer _tok;
    readonly EngineOptions _options;
    readonly Channel<Work> _queue = Channel.CreateUnbounded<Work>();
    readonly Thread _worker;
    readonly CancellationTokenSource _stop = new();
    readonly PagedKvCache _cache;
    readonly PagedContext _context;
    readonly Scheduler _scheduler;
    readonly bool _longRope;
    readonly DecodeGraphs? _graphs;
    bool _adaptersChanged = true;

    public int MaxBatch => _options.MaxBatch;
    public EngineOptions Options => _options;
    public CausalLM Model => _lm.Model;
    /// <summary>For thread-safe reads only (layer shapes, loaded configs); mutate through <see cref="RunAsync{T}"/>.</summary>
    public LoraModel Lora => _lm;
    public Tokenizer Tokenizer => _tok;
    /// <summary>Prompt and output tokens together (max_position_embeddings); longer prompts are refused, outputs stop there.</summary>
    public int ContextLength => _lm.Model.Config.MaxPositionEmbeddings;
    /// <summary>Largest number of sequences in one step so far (for tests and benchmarks).</summary>
    public int PeakBatch { get; private set; }
    /// <summary>KV blocks preallocated, and in use now.</summary>
    public int KvBlocks => _cache.Blocks;
    public int KvBlocksUsed => Volatile.Read(ref _usedBlocks);
    int _usedBlocks;
    /// <summary>Steps run so far, and how many of them held both prefill chunks and decode tokens.</summary>
    public long Steps { get; private set; }
    public long MixedSteps { get; private set; }
    /// <summary>Sequences preempted for lack of KV blocks (and recomputed) so far.</summary>
    public long Preemptions => _scheduler.Preemptions;
    /// <summary>Requests, tokens, latencies, steps, queue, KV-cache use (rendered by the server's /metrics).</summary>
    public ServingMetrics Metrics { get; } = new();

    public InferenceEngine(LoraModel lm, Tokenizer tokenizer, int maxBatch = 16) : this(lm, tokenizer, new EngineOptions { MaxBatch = maxBatch }) { }

    public InferenceEngine(LoraModel lm, Tokenizer tokenizer, EngineOptions options)
    {
        options.Validate();
        _lm = lm;
        _lm.Model.eval(); // serving never trains: LoRA dropout stays off
        _tok = tokenizer;
        _options = options;
        var c = lm.Model.Config;
        int blocks = KvCacheSizing.Blocks(options, c, lm.Model.DType, lm.Model.Device);
        _cache = new PagedKvCache(c, blocks, options.BlockSize, lm.Model.DType, lm.Model.Device);
        _context = new PagedContext(_cache);
        _longRope = LongRopeRecompute.Due(c, 1, long.MaxValue);
        _scheduler = new Scheduler(options, _cache.Allocator, chunkPrefill: !_longRope);
        _context.Kernel = CudaPagedDecode.TryCreate(c, lm.Model.DType, lm.Model.Device);
        if (GraphsPossible(options, lm)) _graphs = new DecodeGraphs(lm, _context, options.MaxBatch, scratchBlock: _cache.Allocator.TryAllocate());
        SwapAttention(paged: true);
        _worker = new Thread(Loop) { IsBackground = true, Name = "lorakit-engine" };
        _worker.Start();
    }

    /// <summary>Queues a generation with the named adapter (null = base model).</summary>
    public Task<GenerationResult> GenerateAsync(int[] promptIds, string? adapter, SamplingOptions options, Action<string>? onText = null, CancellationToken ct = default)
    {
        if (promptIds.Length == 0) throw new ArgumentException("the prompt encodes to no tokens");
        SequenceState.CheckPromptFits(promptIds.Length, ContextLength);
        options.Validate();
        var done = new TaskCompletionSource<GenerationResult>(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_queue.Writer.TryWrite(new GenerateWork(new EngineRequest(promptIds, adapter, options, onText, done, ct)))) throw new ObjectDisposedException(nameof(InferenceEngine));
        Metrics.RequestQueued();
        return done.Task;
    }

    /// <summary>Runs <paramref name="f"/> on the engine thread between steps (adapter loads/unloads).</summary>
    public async Task<T> RunAsync<T>(Func<LoraModel, T> f)
    {
        var done = new TaskCompletionSource<object?>(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_queue.Writer.TryWrite(new ActionWork(() => f(_lm), done))) throw new ObjectDisposedException(nameof(InferenceEngine));
        return (T)(await done.Task)!;
    }

    /// <summary>Decode steps replayed as CUDA graphs: replays and captures so far, or why they are off (null engine: not on CUDA).</summary>
    public (long Replays, long Captures, string? Disabled)? GraphStats => _graphs is { } g ? (g.Replays, g.Captures, g.Disabled) : null;

    /// <summary>Graphs need CUDA, the paged-attention kernel (the gather path's shapes change every step), a settable stream and no LongRoPE (its factors are chosen on the host).</summary>
    bool GraphsPossible(EngineOptions o, LoraModel lm) =>
        o.CudaGraphs && lm.Model.Device.type == TorchSharp.DeviceType.CUDA && _context.Kernel is not null && !_longRope
        && Runtime.Cuda.CudaStreams.Available && _cache.Allocator.Free > 1;

    void Loop()
    {
        using var _ = no_grad();
        // Graph capture needs a stream other than the legacy default one; every step runs on it, eager or replayed.
        using var stream = _graphs is not null ? Runtime.Cuda.CudaStreams.UseSideStream(_lm.Model.Device) : null;
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                bool idle = _scheduler.Running.Count == 0 && _scheduler.Waiting.Count == 0;
                if (idle && !_queue.Reader.WaitToReadAsync(_stop.Token).AsTask().GetAwaiter().GetResult()) break;
                while (_queue.Reader.TryRead(out var work))
                {
                    if (work is ActionWork a) RunAction(a);
                    else Arrive(((GenerateWork)work).Request);
                }
                DropCancelled();
                try { Step(); }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    // An exception on this thread would end the whole process: the step's requests fail with it
                    // instead, and the engine goes on with the next ones.
                    foreach (var seq in _scheduler.Running.ToList()) Fail(seq, e);
                }
                UpdateGauges();
            }
        }
        catch (OperationCanceledException) { }
        catch (ObjectDisposedException) { } // disposed while waiting for work
        finally
        {
            foreach (var seq in _scheduler.Running.Concat(_scheduler.Waiting).ToList())
            {
                _scheduler.Retire(seq);
                seq.Request.Done.TrySetCanceled();
                Metrics.RequestFinished("cancelled");
            }
            UpdateGauges();
        }
    }

    void UpdateGauges()
    {
        Metrics.SetQueueLength(_scheduler.Waiting.Count + _queue.Reader.Count);
        Metrics.SetRunning(_scheduler.Running.Count);
        Metrics.SetKvCache(_scheduler.UsedBlocks, _cache.Blocks);
    }

    void RunAction(ActionWork a)
    {
        _adaptersChanged = true; // an adapter load or unload allocates or frees device memory: graphs are captured again
        try { a.Done.TrySetResult(a.Run()); }
        catch (Exception e) { a.Done.TrySetException(e); }
    }

    void Arrive(EngineRequest r)
    {
        try
        {
            if (r.Cancel.IsCancellationRequested) { r.Done.TrySetCanceled(); Metrics.RequestFinished("cancelled"); return; }
            if (r.Adapter != null && !_lm.Configs.ContainsKey(r.Adapter)) throw new KeyNotFoundException($"adapter '{r.Adapter}' is not loaded");
            // Stop strings are found in the text, so such a request decodes on this thread; others stream from another.
            bool inline = r.Options.StopStrings.Count > 0;
            var streamer = r.OnText is { } cb && !inline ? new TextStreamer(_tok, cb) : null;
            var state = new SequenceState(r.PromptIds, r.Options, _tok, inline ? r.OnText : null, ContextLength);
            Metrics.RequestAdmitted();
            Metrics.PromptTokens(r.PromptIds.Length);
            if (r.Options.MaxNewTokens == 0) { r.Done.TrySetResult(state.Result()); Metrics.RequestFinished("length"); return; }
            _scheduler.Waiting.AddLast(new EngineSequence(r, state, streamer));
        }
        catch (Exception e) { r.Done.TrySetException(e); Metrics.RequestFinished("error"); }
    }

    void DropCancelled()
    {
        foreach (var seq in _scheduler.Running.Concat(_scheduler.Waiting).ToList())
        {
            if (seq.Request.Cancel.IsCancellationRequested)
            {
                _scheduler.Retire(seq); // a cancelled stream frees its blocks at once
                seq.Request.Done.TrySetCanceled();
                Metrics.RequestFinished("cancelled");
            }
            else if (seq.Streamer?.Error is { } error) Fail(seq, error);
        }
    }

    void Step()
    {
        var work = _scheduler.Next();
        foreach (var (seq, error) in _scheduler.Rejected) { seq.Request.Done.TrySetException(error); Metrics.RequestFinished("error"); }
        _scheduler.Rejected.Clear();
        Volatile.Write(ref _usedBlocks, _scheduler.UsedBlocks);
        if (work.Count == 0) return;
        long started = Stopwatch.GetTimestamp();
        PeakBatch = Math.Max(PeakBatch, work.Count);
        Steps++;
        if (work.Any(w => w.Count > 1) && work.Any(w => w.Count == 1 && w.Seq.Computed > 0)) MixedSteps++;
        if (_longRope) PrepareLongRope(work);
        // LoRA-free groups of positions share one forward; a LongRoPE model runs short- and long-factor sequences apart.
        foreach (var group in work.GroupBy(w => _longRope && LongFactors(w.Seq.Computed + w.Count)))
            Forward(group.ToList());
        Volatile.Write(ref _usedBlocks, _scheduler.UsedBlocks);
        Metrics.Step(work.Count, work.Sum(w => w.Count), Stopwatch.GetElapsedTime(started).TotalSeconds);
    }

    /// <summary>Phi-3 LongRoPE: a sequence crossing original_max_position_embeddings is recomputed whole with the long factors.</summary>
    void PrepareLongRope(List<(EngineSequence Seq, int Count)> work)
    {
        for (int i = 0; i < work.Count; i++)
        {
            var (seq, count) = work[i];
            if (!LongRopeRecompute.Due(_lm.Model.Config, seq.Computed, seq.Computed + count)) continue;
            seq.Computed = 0;
            work[i] = (seq, seq.Tokens.Count);
        }
    }

    /// <summary>Whether a forward reaching <paramref name="positions"/> uses LongRoPE's long factors (past original_max_position_embeddings).</summary>
    bool LongFactors(long positions) => LongRopeRecompute.Due(_lm.Model.Config, 1, positions);

    void Forward(List<(EngineSequence Seq, int Count)> work)
    {
        using var scope = NewDisposeScope();
        var items = work.Select(w => new StepWork(w.Seq.Tokens, w.Seq.Computed, w.Count, w.Seq.Blocks, w.Seq.Request.Adapter)).ToList();
        if (TryGraph(items) is { } replayed)
        {
            foreach (var (seq, count) in work) seq.Computed += count;
            Sample(work.Select(w => w.Seq).ToList(), replayed);
            return;
        }
        using var plan = new StepPlan(items, _cache.BlockSize, _lm.Model.Device, gatherDecode: _context.Kernel is null);
        // Only sequences whose last pending token runs now sample; a partial prefill chunk needs no logits.
        var sampling = Enumerable.Range(0, work.Count).Where(i => items[i].Context == work[i].Seq.Tokens.Count).ToList();
        _context.Plan = plan;
        Tensor logits;
        try
        {
            SetAdapters(plan);
            var rows = tensor(sampling.Select(i => (long)plan.LastTokenIndex[i]).ToArray(), device: _lm.Model.Device);
            logits = _lm.Model.LogitsAt(plan.Ids, rows, plan.Positions);
        }
        finally
        {
            _context.Plan = null;
            _lm.SetRowAdapters(null);
            _lm.SetRowSlots(null);
        }
        foreach (var (seq, count) in work) seq.Computed += count;
        Sample(sampling.Select(i => work[i].Seq).ToList(), logits);
    }

    /// <summary>
    /// Each packed token's adapter for the LoRA layers: on CUDA, when every adapter in the step is a plain LoRA, one slot
    /// tensor for all layers (the gathered kernel reads each token's adapter in place); otherwise the names (the CPU
    /// reference: gathered single tokens, one matmul pair per run of a prefill chunk, DoRA through its own forward).
    /// </summary>
    void SetAdapters(StepPlan plan)
    {
        if (plan.TokenAdapters.All(a => a is null)) return;
        bool plain = plan.TokenAdapters.All(a => a is null || _lm.Configs[a].Variant.IsPlainTerm);
        if (plain && Runtime.Cuda.LoraGatherKernels.Usable(_lm.Model.Device))
        {
            SyncStacksIfChanged();
            var slots = tensor(plan.TokenAdapters.Select(a => a is null ? 0L : _lm.SlotOf(a)).ToArray(), device: _lm.Model.Device);
            _lm.SetRowSlots(slots);
        }
        else _lm.SetRowAdapters(plan.TokenAdapters);
    }

    void SyncStacksIfChanged()
    {
        if (!_adaptersChanged) return;
        _lm.SyncStacks(_lm.Model.DType);
        _graphs?.Invalidate();
        _adaptersChanged = false;
    }

    /// <summary>The step's logits from a replayed graph, or null when it runs eagerly.</summary>
    Tensor? TryGraph(List<StepWork> items)
    {
        if (_graphs is null || items.Any(w => w.Adapter is { } a && !_lm.Configs[a].Variant.IsPlainTerm)) return null;
        SyncStacksIfChanged();
        return _graphs.TryRun(items, lora: items.Any(w => w.Adapter is not null));
    }

    /// <summary>The next token of each sampling sequence: all greedy rows' argmax in one device→host copy.</summary>
    void Sample(List<EngineSequence> seqs, Tensor logits)
    {
        if (seqs.Count == 0) return;
        Metrics.OutputTokens(seqs.Count);
        var greedy = seqs.Any(s => s.State.IsGreedy) ? logits.argmax(1).cpu().data<long>().ToArray() : null;
        long now = Stopwatch.GetTimestamp();
        for (int i = 0; i < seqs.Count; i++)
        {
            var seq = seqs[i];
            int token = seq.State.IsGreedy ? (int)greedy![i] : SampleOne(seq, logits[i]);
            if (seq.FirstTokenAt is null) Metrics.FirstToken(Stopwatch.GetElapsedTime(seq.Request.ArrivedAt, now).TotalSeconds);
            else Metrics.TimePerOutputToken(Stopwatch.GetElapsedTime(seq.LastTokenAt, now).TotalSeconds);
            seq.FirstTokenAt ??= now;
            seq.LastTokenAt = now;
            seq.Tokens.Add(token);
            seq.Streamer?.Push(token);
            bool finished;
            try { finished = seq.State.Accept(token); }
            catch (Exception e) { Fail(seq, e); continue; }
            if (finished) Complete(seq);
        }
    }

    static int SampleOne(EngineSequence seq, Tensor logits) => seq.State.Choose(logits);

    void Complete(EngineSequence seq)
    {
        _scheduler.Retire(seq);
        Metrics.RequestFinished(seq.State.FinishReason == FinishReason.Stop ? "stop" : "length");
        var state = seq.State;
        var streamer = seq.Streamer;
        var done = seq.Request.Done;
        double Since(long t) => Stopwatch.GetElapsedTime(seq.Request.ArrivedAt, t).TotalSeconds;
        var timing = new RequestTiming(Since(seq.FirstTokenAt ?? seq.LastTokenAt), Since(seq.LastTokenAt), seq.Tokens.Count - seq.Request.PromptIds.Length);
        // The final detokenization and the last streamed piece happen off the engine thread.
        _ = Task.Run(async () =>
        {
            try
            {
                var result = state.Result() with { Timing = timing };
                if (streamer is not null) await streamer.CompleteAsync(result.Text);
                done.TrySetResult(result);
            }
            catch (Exception e) { done.TrySetException(e); }
        });
    }

    void Fail(EngineSequence seq, Exception e)
    {
        _scheduler.Retire(seq);
        Metrics.RequestFinished("error");
        seq.Request.Done.TrySetException(e);
    }

    /// <summary>Puts <see cref="PagedAttention"/> in place of each layer's attention, or the original back.</summary>
    void SwapAttention(bool paged)
    {
        var layers = _lm.Model.model.layers;
        for (int i = 0; i < layers.Count; i++)
        {
            var layer = layers[i];
            Attention attn = paged
                ? new PagedAttention(layer.self_attn, _context, _lm.Model.Config.SlidingWindows[i])
                : layer.self_attn is PagedAttention p ? p.Restore() : layer.self_attn;
            layer.ReplaceChild(nameof(layer.self_attn), attn, keepPlace: true);
        }
    }

    public void Dispose()
    {
        _queue.Writer.TryComplete();
        _stop.Cancel();
        // The worker finishes its current step first; disposing the token source under a running worker would make
        // its next wait throw on a thread where nothing catches it.
        if (_worker.Join(TimeSpan.FromSeconds(60)))
        {
            _stop.Dispose();
            SwapAttention(paged: false);
            _graphs?.Dispose();
            _cache.Dispose();
        }
    }
}
