using System.Text.RegularExpressions;
using LoraKit.Lora;

namespace LoraKit.Serving;

/// <summary>A requested adapter name that is not a plain name (letters, digits, '.', '_', '-') or that resolves outside the
/// adapters directory; the server answers it as a client error.</summary>
public sealed class AdapterNameException(string message) : LoraKitException(message);

/// <summary>Every device adapter slot serves requests, and none was released in time.</summary>
public sealed class AdapterSlotsBusyException(string message) : InvalidOperationException(message);

/// <summary>
/// The adapters a server may use: subdirectories of one root, addressed by plain name only (no paths, no "..", no
/// symlinks leading outside the root), loaded on first use and evicted least-recently-used beyond a cap (the GPU tier);
/// read and validated adapters also stay in host memory up to <see cref="MaxHostAdapters"/> (the host tier, S-LoRA's
/// unified paging), so a request for an adapter evicted from the device costs a host-to-device copy, not a read. Only
/// adapter_config.json and adapter_model.safetensors are read. Loads run on the engine thread between decode steps.
/// Names containing '@' are not directory names: they go to <see cref="External"/> (the server's registry versions), are
/// loaded, counted in flight and evicted like the others. A null root serves no directory adapters.
/// </summary>
public sealed partial class AdapterRegistry(InferenceEngine engine, string? root, int maxLoaded)
{
    readonly string? _root = root is null ? null : Path.GetFullPath(root);
    readonly SemaphoreSlim _lock = new(1, 1);
    readonly LinkedList<string> _lru = new(); // most recent first
    readonly Dictionary<string, int> _inFlight = [];

    [GeneratedRegex(@"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\z")]
    private static partial Regex PlainName();

    /// <summary>Adapters kept read and validated in host memory (least recently used dropped beyond it); 0: none.</summary>
    public int MaxHostAdapters { get; init; } = 8;

    readonly LinkedList<string> _hostLru = new(); // most recent first; guarded by _lock
    readonly Dictionary<string, AdapterFiles.Prepared> _host = new(StringComparer.Ordinal);

    /// <summary>Counts of where acquired adapters came from: already on the device, from the host tier, read from disk.</summary>
    public (long DeviceHits, long HostHits, long Reads) CacheStats { get { lock (_lru) return (_deviceHits, _hostHits, _reads); } }
    long _deviceHits, _hostHits, _reads;

    /// <summary>Reacts to each acquisition: "gpu_hit", "cpu_hit" or "load" (metrics).</summary>
    public Action<string>? OnCacheOutcome { get; init; }
    /// <summary>Reacts to each eviction for space: "gpu" (off the device) or "cpu" (out of the host tier).</summary>
    public Action<string>? OnEvicted { get; init; }

    /// <summary>Load adapters LoraKit recorded as trained on another base anyway (a warning each time).</summary>
    public bool AllowBaseMismatch { get; init; }

    /// <summary>
    /// The directory to load for a name containing '@' (never a directory name), or null to refuse such names. It throws
    /// <see cref="KeyNotFoundException"/> for an unknown name; it runs only when the name is not loaded yet.
    /// </summary>
    public Func<string, string>? External { get; init; }

    /// <summary>Names of the adapters loaded now, most recently used first.</summary>
    public IReadOnlyCollection<string> Loaded { get { lock (_lru) return _lru.ToList(); } }

    /// <summary>The directory of a valid adapter name, or an error saying why the name is refused.</summary>
    public string Resolve(string name)
    {
        if (External is not null && name.Contains('@')) return External(name);
        if (!PlainName().IsMatch(name) || name.Contains(".."))
            throw new AdapterNameException($"'{Shown(name)}' is not a plain adapter name (letters, digits, '.', '_', '-'; no paths)");
        if (_root is null) throw new KeyNotFoundException($"no adapter named '{name}'");
        var dir = Path.Combine(_root, name);
        if (!Directory.Exists(dir)) throw new KeyNotFoundException($"no adapter named '{name}'");
        // A symlink may point anywhere: follow it and insist the target is still inside the root.
        var target = new DirectoryInfo(dir).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? dir;
        var full = Path.GetFullPath(target);
        if (!Inside(full))
            throw new AdapterNameException($"adapter '{name}' resolves outside the adapters directory");
        foreach (var f in new[] { AdapterFiles.ConfigFile, AdapterFiles.WeightsFile })
        {
            var fi = new FileInfo(Path.Combine(full, f));
            if (fi.Exists && fi.ResolveLinkTarget(true) is { } t && !Inside(Path.GetFullPath(t.FullName)))
                throw new AdapterNameException($"adapter '{name}' has a file that links outside the adapters directory");
        }
        return full;
    }

    /// <summary>A client-chosen name as error messages show it: control characters replaced, at most 80 characters.</summary>
    public static string Shown(string name)
    {
        var s = new string(name.Select(ch => char.IsControl(ch) || ch is '\u2028' or '\u2029' ? '?' : ch).ToArray());
        return s.Length > 80 ? s[..80] + "…" : s;
    }

    bool Inside(string fullPath) => fullPath.StartsWith(_root + Path.DirectorySeparatorChar, StringComparison.Ordinal);

    /// <summary>Names of the adapter directories under the root (whether loaded or not).</summary>
    public IReadOnlyList<string> Available() => _root is not null && Directory.Exists(_root)
        ? Directory.GetDirectories(_root).Select(Path.GetFileName).OfType<string>()
            .Where(n => PlainName().IsMatch(n) && File.Exists(Path.Combine(_root, n, AdapterFiles.ConfigFile))).Order(StringComparer.Ordinal).ToList()
        : [];

    /// <summary>Makes sure the adapter is loaded, marks it in use and returns a handle that releases it.</summary>
    /// <summary>
    /// Makes sure the adapter is loaded, marks it in use and returns a handle that releases it. When every device slot
    /// serves requests, waits (up to <see cref="SlotWait"/>) for one to be released instead of failing at once.
    /// </summary>
    public async Task<IDisposable> AcquireAsync(string name, CancellationToken ct = default)
    {
        var deadline = DateTime.UtcNow + SlotWait;
        while (true)
        {
            Task freed;
            lock (_lru) freed = _slotFreed.Task;
            try { return await TryAcquireAsync(name); }
            catch (AdapterSlotsBusyException) when (DateTime.UtcNow < deadline)
            {
                await Task.WhenAny(freed, Task.Delay(TimeSpan.FromSeconds(1), ct)); // re-checks at least once a second
                ct.ThrowIfCancellationRequested();
            }
        }
    }

    /// <summary>How long a request waits for a device adapter slot when all serve other requests.</summary>
    public TimeSpan SlotWait { get; init; } = TimeSpan.FromSeconds(30);

    TaskCompletionSource _slotFreed = new(TaskCreationOptions.RunContinuationsAsynchronously);

    async Task<IDisposable> TryAcquireAsync(string name)
    {
        await _lock.WaitAsync();
        try
        {
            bool loaded;
            lock (_lru) loaded = _lru.Contains(name);
            if (loaded) Count("gpu_hit");
            else await LoadLockedAsync(name, reload: false);
            lock (_lru)
            {
                _lru.Remove(name);
                _lru.AddFirst(name);
                _inFlight[name] = _inFlight.GetValueOrDefault(name) + 1;
            }
            return new Release(this, name);
        }
        finally { _lock.Release(); }
    }

    sealed class Release(AdapterRegistry r, string name) : IDisposable
    {
        int _done;
        public void Dispose()
        {
            if (Interlocked.Exchange(ref _done, 1) == 1) return;
            lock (r._lru)
            {
                if (--r._inFlight[name] > 0) return;
                var freed = r._slotFreed; // wake requests waiting for a device slot
                r._slotFreed = new(TaskCreationOptions.RunContinuationsAsynchronously);
                freed.TrySetResult();
            }
        }
    }

    public async Task LoadAsync(string name, bool reload)
    {
        await _lock.WaitAsync();
        try { await LoadLockedAsync(name, reload); }
        finally { _lock.Release(); }
    }

    async Task LoadLockedAsync(string name, bool reload)
    {
        var dir = Resolve(name);
        bool loaded;
        lock (_lru) loaded = _lru.Contains(name);
        if (loaded && !reload) return;
        if (loaded && InFlight(name) > 0) throw new InvalidOperationException($"adapter '{name}' is serving requests; retry the reload when they finish");
        if (!loaded)
        {
            string? victim;
            lock (_lru) victim = _lru.Count >= maxLoaded ? _lru.Reverse().FirstOrDefault(n => _inFlight.GetValueOrDefault(n) == 0) : null;
            lock (_lru) if (_lru.Count >= maxLoaded && victim is null) throw new AdapterSlotsBusyException($"all {maxLoaded} adapter slots are serving requests; try again shortly");
            if (victim != null) { await UnloadLockedAsync(victim); OnEvicted?.Invoke("gpu"); }
        }
        var prepared = await HostCopyLockedAsync(name, dir, reload);
        await engine.RunAsync(lm =>
        {
            if (lm.Configs.ContainsKey(name)) lm.DeleteAdapter(name);
            AdapterFiles.Apply(lm, name, prepared);
            lm.SetActive(); // serving selects adapters per row, never globally
            return true;
        });
        lock (_lru) { _lru.Remove(name); _lru.AddFirst(name); }
        if (MaxHostAdapters == 0) DropHost(name);
    }

    /// <summary>Reads the adapter into the host tier (not onto the device), so a later request finds it there.</summary>
    public async Task PrefetchAsync(string name)
    {
        await _lock.WaitAsync();
        try { await HostCopyLockedAsync(name, Resolve(name), reload: false); }
        finally { _lock.Release(); }
    }

    /// <summary>The adapter's validated host copy: from the host tier, or read now (off the engine thread) and kept there.</summary>
    async Task<AdapterFiles.Prepared> HostCopyLockedAsync(string name, string dir, bool reload)
    {
        if (!reload && _host.TryGetValue(name, out var cached))
        {
            _hostLru.Remove(name);
            _hostLru.AddFirst(name);
            Count("cpu_hit");
            return cached;
        }
        Count("load");
        DropHost(name);
        // Classification adapters load too (their LoRA part); the server checks each request's task against the adapter's.
        var prepared = await Task.Run(() => AdapterFiles.Read(engine.Lora, dir, new AdapterLoadOptions { AllowBaseMismatch = AllowBaseMismatch, SequenceClassification = true }));
        _host[name] = prepared;
        _hostLru.AddFirst(name);
        while (_hostLru.Count > Math.Max(1, MaxHostAdapters)) { DropHost(_hostLru.Last!.Value); OnEvicted?.Invoke("cpu"); }
        return prepared;
    }

    void DropHost(string name)
    {
        if (!_host.Remove(name, out var p)) return;
        _hostLru.Remove(name);
        p.Dispose(); // device copies are separate (Apply copies), so the loaded adapter is untouched
    }

    void Count(string outcome)
    {
        lock (_lru)
        {
            if (outcome == "gpu_hit") _deviceHits++;
            else if (outcome == "cpu_hit") _hostHits++;
            else _reads++;
        }
        OnCacheOutcome?.Invoke(outcome);
    }

    public async Task UnloadAsync(string name)
    {
        await _lock.WaitAsync();
        try
        {
            lock (_lru) if (!_lru.Contains(name)) throw new KeyNotFoundException($"adapter '{Shown(name)}' is not loaded");
            if (InFlight(name) > 0) throw new InvalidOperationException($"adapter '{name}' is serving requests; retry when they finish");
            await UnloadLockedAsync(name);
            DropHost(name); // an explicit unload forgets the adapter; the next load reads its files again
        }
        finally { _lock.Release(); }
    }

    async Task UnloadLockedAsync(string name)
    {
        await engine.RunAsync(lm => { lm.DeleteAdapter(name); return true; });
        lock (_lru) _lru.Remove(name);
    }

    int InFlight(string name) { lock (_lru) return _inFlight.GetValueOrDefault(name); }
}
