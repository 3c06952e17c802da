using System.Diagnostics; // metrics
using System.Threading.Channels;
using LoraKit.Generation;
using LoraKit.Lora;
using LoraKit.Models;
using LoraKit.Tokenization;
using static TorchSharp.torch;

namespace LoraKit.Serving;

/// <summary>
/// One base model, many adapters, continuous batching. A single worker thread owns the model (TorchSharp models are not
/// shared across threads); requests wait in a channel and join the running batch between decode steps. Each new request
/// is prefilled alone with its adapter, then its KV cache joins the batch (rows left-padded to one length, padding
/// masked, positions counted per row); every decode step is one forward over all rows, the LoRA contribution computed
/// per row with that row's adapter (base rows get none). Finished rows leave the batch at once.
/// Adapter loads and unloads run on the same thread between steps, so they never race a forward.
/// </summary>
public sealed class InferenceEngine : IDisposable
{
    abstract record Work;
    sealed record Generate(int[] PromptIds, string? Adapter, SamplingOptions Options, Action<string>? OnText,
        TaskCompletionSource<GenerationResult> Done, CancellationToken Cancel) : Work
    {
        public long Arrived { get; } = Stopwatch.GetTimestamp(); // metrics
    }
    sealed record Action(Func<object?> Run, TaskCompletionSource<object?> Done) : Work;

    sealed class Row(Generate request, SequenceState state)
    {
        public Generate Request { get; } = request;
        public SequenceState State { get; } = state;
        public long LastTokenAt = Stopwatch.GetTimestamp(); // metrics
    }

    readonly LoraModel _lm;
    readonly Tokenizer _tok;
    readonly Channel<Work> _queue = Channel.CreateUnbounded<Work>();
    readonly Thread _worker;
    readonly CancellationTokenSource _stop = new();

    public int MaxBatch { get; }
    public CausalLM Model => _lm.Model;
    /// <summary>For thread-safe reads only (layer shapes, loaded configs); mutate through <see cref="RunAsync{T}"/>.</summary>
    public LoraModel Lora => _lm;
    public Tokenizer Tokenizer => _tok;
    /// <summary>Prompt and output tokens together (max_position_embeddings); longer prompts are refused, outputs stop there.</summary>
    public int ContextLength => _lm.Model.Config.MaxPositionEmbeddings;
    /// <summary>Operations metrics of this engine (the server's GET /metrics renders them).</summary>
    public ServingMetrics Metrics { get; } = new(); // metrics
    /// <summary>Largest number of rows decoded together so far (for tests and benchmarks).</summary>
    public int PeakBatch { get; private set; }

    public InferenceEngine(LoraModel lm, Tokenizer tokenizer, int maxBatch = 16)
    {
        _lm = lm;
        _lm.Model.eval(); // serving never trains: LoRA dropout stays off
        _tok = tokenizer;
        MaxBatch = maxBatch;
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
        if (!_queue.Writer.TryWrite(new Generate(promptIds, adapter, options, onText, done, ct))) throw new ObjectDisposedException(nameof(InferenceEngine));
        Metrics.RequestQueued(); // metrics
        return done.Task;
    }

    /// <summary>Runs <paramref name="f"/> on the engine thread between decode steps (adapter loads/unloads).</summary>
    public async Task<T> RunAsync<T>(Func<LoraModel, T> f)
    {
        var done = new TaskCompletionSource<object?>(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_queue.Writer.TryWrite(new Action(() => f(_lm), done))) throw new ObjectDisposedException(nameof(InferenceEngine));
        return (T)(await done.Task)!;
    }

    void Loop()
    {
        var rows = new List<Row>();
        KvCache? cache = null;
        Tensor? mask = null; // [B, S] int64, 1 = real position
        using var _ = no_grad();
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                // Idle: wait for work. Busy: take whatever arrived since the last step, up to the batch limit.
                if (rows.Count == 0 && !_queue.Reader.WaitToReadAsync(_stop.Token).AsTask().GetAwaiter().GetResult()) break;
                while (rows.Count < MaxBatch && _queue.Reader.TryRead(out var work))
                {
                    if (work is Action a) { RunAction(a); continue; }
                    var g = (Generate)work;
                    if (g.Cancel.IsCancellationRequested) { g.Done.TrySetCanceled(); Metrics.RequestFinished("cancelled"); continue; } // metrics
                    try { Admit(g, rows, ref cache, ref mask); }
                    catch (Exception e) { g.Done.TrySetException(e); Metrics.RequestFinished("error"); } // metrics
                }
                Metrics.SetQueueLength(_queue.Reader.Count); // metrics
                Metrics.SetRunning(rows.Count); // metrics
                if (rows.Count == 0) continue;
                PeakBatch = Math.Max(PeakBatch, rows.Count);
                try
                {
                    long stepStart = Stopwatch.GetTimestamp(); // metrics
                    DecodeStep(rows, ref cache, ref mask);
                    Metrics.Step(rows.Count, rows.Count, Stopwatch.GetElapsedTime(stepStart).TotalSeconds); // metrics
                    Retire(rows, ref cache, ref mask);
                    Metrics.SetRunning(rows.Count); // metrics
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    // An exception on this thread would end the whole process: the batch's requests fail with it
                    // instead, and the engine goes on with the next ones on a fresh cache.
                    foreach (var r in rows) { r.Request.Done.TrySetException(e); Metrics.RequestFinished("error"); } // metrics
                    rows.Clear();
                    Metrics.SetRunning(0); // metrics
                    cache?.Dispose(); cache = null;
                    mask?.Dispose(); mask = null;
                }
            }
        }
        catch (OperationCanceledException) { }
        catch (ObjectDisposedException) { } // disposed while waiting for work
        finally
        {
            foreach (var r in rows) { r.Request.Done.TrySetCanceled(); Metrics.RequestFinished("cancelled"); } // metrics
            cache?.Dispose();
            mask?.Dispose();
        }
    }

    void RunAction(Action a)
    {
        try { a.Done.TrySetResult(a.Run()); }
        catch (Exception e) { a.Done.TrySetException(e); }
    }

    /// <summary>Prefills one request alone, then merges its cache into the batch's.</summary>
    void Admit(Generate g, List<Row> rows, ref KvCache? cache, ref Tensor? mask)
    {
        if (g.Adapter != null && !_lm.Configs.ContainsKey(g.Adapter)) throw new KeyNotFoundException($"adapter '{g.Adapter}' is not loaded");
        var state = new SequenceState(g.PromptIds, g.Options, _tok, g.OnText, ContextLength);
        Metrics.RequestAdmitted(); // metrics
        Metrics.PromptTokens(g.PromptIds.Length); // metrics
        if (g.Options.MaxNewTokens == 0) { g.Done.TrySetResult(state.Result()); Metrics.RequestFinished(Reason(state)); return; } // metrics
        var rowCache = new KvCache(_lm.Model.Config.NumHiddenLayers);
        long prefillStart = Stopwatch.GetTimestamp(); // metrics
        using (var scope = NewDisposeScope())
        {
            _lm.SetRowAdapters([g.Adapter]);
            var ids = tensor(g.PromptIds.Select(x => (long)x).ToArray(), device: _lm.Model.Device).unsqueeze(0);
            var logits = _lm.Model.Logits(ids, null, rowCache);
            bool finished = state.Step(logits[0, -1]);
            Metrics.FirstToken(Stopwatch.GetElapsedTime(g.Arrived).TotalSeconds); // metrics
            Metrics.OutputTokens(1); // metrics
            Metrics.Step(1, g.PromptIds.Length, Stopwatch.GetElapsedTime(prefillStart).TotalSeconds); // metrics
            if (finished)
            {
                rowCache.Dispose();
                g.Done.TrySetResult(state.Result());
                Metrics.RequestFinished(Reason(state)); // metrics
                return;
            }
        }
        long r = g.PromptIds.Length;
        var rowMask = ones(1, r, ScalarType.Int64, _lm.Model.Device);
        if (cache is null || rows.Count == 0)
        {
            cache?.Dispose(); mask?.Dispose();
            cache = rowCache;
            mask = rowMask.DetachFromDisposeScope();
        }
        else
        {
            long s = cache.Length;
            if (r < s)
            {
                rowCache.PadLeft(s - r);
                var padded = cat([zeros(1, s - r, ScalarType.Int64, rowMask.device), rowMask], 1);
                rowMask.Dispose();
                rowMask = padded;
            }
            else if (r > s)
            {
                cache.PadLeft(r - s);
                var padded = cat([zeros(mask!.shape[0], r - s, ScalarType.Int64, mask.device), mask], 1);
                mask.Dispose();
                mask = padded;
            }
            cache.AppendRows(rowCache);
            rowCache.Dispose();
            var merged = cat([mask!, rowMask], 0).DetachFromDisposeScope();
            mask!.Dispose(); rowMask.Dispose();
            mask = merged;
        }
        rows.Add(new Row(g, state));
    }

    void DecodeStep(List<Row> rows, ref KvCache? cache, ref Tensor? mask)
    {
        using var scope = NewDisposeScope();
        Tensor ids, full;
        long longest = mask!.sum([1]).max().item<long>(); // real positions cached in the longest row
        if (LongRopeRecompute.Due(_lm.Model.Config, longest, longest + 1))
        {
            // Phi-3 LongRoPE switches to the long factors at this step: every row's whole sequence again, left-padded,
            // on a fresh cache (as TextGenerator and transformers' Phi3ForCausalLM do).
            var seqs = rows.Select(r => r.State.Ids).ToList();
            int s = seqs.Max(x => x.Length);
            ids = tensor(seqs.SelectMany(x => Enumerable.Repeat(0L, s - x.Length).Concat(x.Select(v => (long)v))).ToArray(),
                device: _lm.Model.Device).reshape(rows.Count, s);
            full = tensor(seqs.SelectMany(x => Enumerable.Repeat(0L, s - x.Length).Concat(Enumerable.Repeat(1L, x.Length))).ToArray(),
                device: _lm.Model.Device).reshape(rows.Count, s);
            cache!.Dispose();
            cache = new KvCache(_lm.Model.Config.NumHiddenLayers);
        }
        else
        {
            ids = tensor(rows.Select(r => (long)r.State.LastToken).ToArray(), device: _lm.Model.Device).unsqueeze(1);
            full = cat([mask, ones(rows.Count, 1, ScalarType.Int64, mask.device)], 1);
        }
        _lm.SetRowAdapters(rows.Select(r => r.Request.Adapter).ToArray());
        var last = _lm.Model.Logits(ids, full, cache)[.., -1];
        // One device→host copy for every greedy row's token instead of a synchronisation per row.
        var greedy = last.argmax(1).cpu().data<long>().ToArray();
        int accepted = 0; // metrics
        long now = Stopwatch.GetTimestamp(); // metrics
        for (int i = 0; i < rows.Count; i++)
        {
            var st = rows[i].State;
            if (rows[i].Request.Cancel.IsCancellationRequested) continue;
            if (st.IsGreedy) st.Accept((int)greedy[i]);
            else st.Step(last[i]);
            accepted++; // metrics
            Metrics.TimePerOutputToken(Stopwatch.GetElapsedTime(rows[i].LastTokenAt, now).TotalSeconds); // metrics
            rows[i].LastTokenAt = now; // metrics
        }
        Metrics.OutputTokens(accepted); // metrics
        mask.Dispose();
        mask = full.DetachFromDisposeScope();
    }

    /// <summary>Completes finished (or cancelled) rows and removes them, and any padding no row needs, from the batch.</summary>
    void Retire(List<Row> rows, ref KvCache? cache, ref Tensor? mask)
    {
        var keep = new List<long>();
        for (int i = 0; i < rows.Count; i++)
        {
            var r = rows[i];
            if (r.Request.Cancel.IsCancellationRequested) { r.Request.Done.TrySetCanceled(); Metrics.RequestFinished("cancelled"); } // metrics
            else if (r.State.Finished) { r.Request.Done.TrySetResult(r.State.Result()); Metrics.RequestFinished(Reason(r.State)); } // metrics
            else keep.Add(i);
        }
        if (keep.Count == rows.Count) return;
        var survivors = keep.Select(i => rows[(int)i]).ToList();
        rows.Clear();
        rows.AddRange(survivors);
        if (rows.Count == 0)
        {
            cache!.Dispose(); cache = null;
            mask!.Dispose(); mask = null;
            return;
        }
        using var scope = NewDisposeScope();
        var idx = tensor(keep.ToArray(), device: mask!.device);
        cache!.SelectRows(idx);
        var kept = mask.index_select(0, idx);
        long lead = kept.argmax(1).min().item<long>(); // first real position of the row that starts earliest
        if (lead > 0)
        {
            cache.TrimLeft(lead);
            kept = kept[.., (int)lead..];
        }
        mask.Dispose();
        mask = kept.contiguous().DetachFromDisposeScope();
    }

    static string Reason(SequenceState s) => s.FinishReason == FinishReason.Stop ? "stop" : "length"; // metrics

    public void Dispose()
    {
        _queue.Writer.TryComplete();
        _stop.Cancel();
        // The worker finishes its current step first; disposing the token source under a running worker would make
        // its next wait throw on a thread where nothing catches it.
        if (_worker.Join(TimeSpan.FromSeconds(60))) _stop.Dispose();
    }
}
