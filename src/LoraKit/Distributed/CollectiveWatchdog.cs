using System.Runtime.InteropServices;

namespace LoraKit.Distributed;

/// <summary>
/// NCCL has no timeout of its own: a collective whose peer died waits for ever, inside a CUDA synchronisation the
/// training thread cannot leave. As torch's NCCL watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING), a thread watches the
/// work it is told about (<see cref="Arm"/>): when the armed work runs past the timeout, or the communicator reports
/// an asynchronous error, it aborts the communicator, prints one line naming the rank and the work, and ends the
/// process with exit code <see cref="ExitCode"/> — the last complete checkpoint on disk stays as it was.
/// </summary>
public sealed class CollectiveWatchdog : IDisposable
{
    /// <summary>The exit code of a process the watchdog ends.</summary>
    public const int ExitCode = 75;

    readonly TimeSpan _timeout;
    readonly Func<string?> _asyncError;
    readonly Action<string> _fail;
    readonly Thread _thread;
    readonly object _gate = new();
    DateTime _armedAt;
    string? _what;
    volatile bool _stopped;

    /// <param name="timeout">how long armed work may take</param>
    /// <param name="asyncError">the communicator's asynchronous error, or null (polled about once a second)</param>
    /// <param name="fail">what to do with the one-line reason: by default abort and exit (see <see cref="AbortAndExit"/>)</param>
    public CollectiveWatchdog(TimeSpan timeout, Func<string?> asyncError, Action<string> fail)
    {
        (_timeout, _asyncError, _fail) = (timeout, asyncError, fail);
        _thread = new Thread(Loop) { IsBackground = true, Name = "lorakit-collective-watchdog" };
        _thread.Start();
    }

    /// <summary>How long armed work may take before the watchdog fails it.</summary>
    public TimeSpan Timeout => _timeout;

    /// <summary>Watches <paramref name="what"/> until the returned scope is disposed (scopes do not nest: the latest wins).</summary>
    public IDisposable Arm(string what)
    {
        lock (_gate) { _what = what; _armedAt = DateTime.UtcNow; }
        return new Disarm(this, what);
    }

    void Loop()
    {
        while (!_stopped)
        {
            Thread.Sleep(TimeSpan.FromMilliseconds(Math.Min(1000, Math.Max(10, _timeout.TotalMilliseconds / 4))));
            string? reason = null;
            lock (_gate)
                if (_what is string what && DateTime.UtcNow - _armedAt > _timeout)
                    reason = $"{what} made no progress for {_timeout.TotalSeconds:G4} s (another rank died or hangs; LORAKIT_NCCL_TIMEOUT sets the limit)";
            reason ??= _what is null ? null : _asyncError() is string e ? $"NCCL reported an error during {_what}: {e}" : null;
            if (reason is null || _stopped) continue;
            _stopped = true;
            _fail(reason);
            return;
        }
    }

    [DllImport("libc", EntryPoint = "_exit")] static extern void NativeExit(int code);

    /// <summary>
    /// Aborts (<paramref name="abort"/>), prints "rank R: reason" on stderr and ends the process at once: managed
    /// shutdown could wait on the very CUDA synchronisation that hangs, so it is skipped (_exit).
    /// </summary>
    public static void AbortAndExit(int rank, string reason, Action abort)
    {
        try { abort(); } catch (Exception) { /* the process ends either way */ }
        Console.Error.WriteLine($"rank {rank}: {reason}; aborted the NCCL communicator and stopped (exit {ExitCode}); the last complete checkpoint is unaffected");
        Console.Error.Flush();
        Console.Out.Flush();
        if (OperatingSystem.IsLinux() || OperatingSystem.IsMacOS()) NativeExit(ExitCode);
        Environment.Exit(ExitCode);
    }

    /// <summary>Stops watching.</summary>
    public void Dispose() => _stopped = true;

    sealed class Disarm(CollectiveWatchdog dog, string what) : IDisposable
    {
        public void Dispose()
        {
            lock (dog._gate) if (dog._what == what) dog._what = null;
        }
    }
}
