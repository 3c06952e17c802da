using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace LoraKit.Distributed;

/// <summary>How a launched group ended: the exit code to return and, when a rank failed, one line saying which and how.</summary>
public sealed record GroupOutcome(int ExitCode, string? Message);

/// <summary>
/// torchrun's single-node part, for <c>lorakit train --gpus N</c>: starts N copies of a command, each with the
/// <see cref="DistributedEnv"/> variables of its rank (MASTER_ADDR 127.0.0.1, a free MASTER_PORT, LOCAL_RANK = RANK),
/// forwards their output line by line prefixed "[rank k] ", and when one exits with an error stops the others (after
/// a grace period: a few seconds, or longer when it was interrupted by a signal, so rank 0 can finish the checkpoint it
/// is writing) and reports it in one line. CUDA_VISIBLE_DEVICES is passed on as it is, never narrowed per rank: each rank uses device
/// LOCAL_RANK among those visible, and NCCL sees every GPU of the group (its peer-to-peer paths need that).
/// </summary>
public sealed class GroupLauncher
{
    readonly List<Process> _ranks = [];

    /// <summary>Exit codes of a rank that stopped on a signal (SIGINT, SIGTERM) after saving its state.</summary>
    static readonly int[] Interrupted = [130, 143];

    /// <summary>How long the other ranks get to finish after one was interrupted, before they are killed.</summary>
    public TimeSpan InterruptGrace { get; init; } = TimeSpan.FromSeconds(120);

    /// <summary>How long the other ranks get to end on their own after one failed, before they are killed.</summary>
    public TimeSpan FailureGrace { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>A TCP port free on this host now (the store binds it a moment later; the usual launcher race).</summary>
    public static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    /// <summary>
    /// Runs <paramref name="fileName"/> <paramref name="args"/> as <paramref name="worldSize"/> ranks and waits for
    /// them; <paramref name="write"/> receives each output line (prefixed) and whether it came from stderr.
    /// </summary>
    public GroupOutcome Run(int worldSize, string fileName, IReadOnlyList<string> args, Action<string, bool> write, IReadOnlyDictionary<string, string>? environment = null)
    {
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize));
        int port = FreePort();
        for (int rank = 0; rank < worldSize; rank++)
        {
            var psi = new ProcessStartInfo(fileName) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (var a in args) psi.ArgumentList.Add(a);
            foreach (var (k, v) in new DistributedEnv(rank, worldSize, rank, "127.0.0.1", port).ToVariables()) psi.Environment[k] = v;
            psi.Environment["LOCAL_WORLD_SIZE"] = worldSize.ToString();
            if (string.IsNullOrEmpty(Environment.GetEnvironmentVariable("NCCL_NVLS_ENABLE"))) psi.Environment["NCCL_NVLS_ENABLE"] = "0";
            if (environment is not null) foreach (var (k, v) in environment) psi.Environment[k] = v;
            var p = new Process { StartInfo = psi };
            string prefix = $"[rank {rank}] ";
            p.OutputDataReceived += (_, e) => { if (e.Data is not null) write(prefix + e.Data, false); };
            p.ErrorDataReceived += (_, e) => { if (e.Data is not null) write(prefix + e.Data, true); };
            p.Start();
            p.BeginOutputReadLine();
            p.BeginErrorReadLine();
            _ranks.Add(p);
        }
        return Wait();
    }

    GroupOutcome Wait()
    {
        while (true)
        {
            var failed = _ranks.Select((p, r) => (p, r)).FirstOrDefault(x => x.p.HasExited && x.p.ExitCode != 0);
            if (failed.p is not null)
            {
                int code = failed.p.ExitCode;
                bool signalled = Interrupted.Contains(code);
                // An error every rank meets (bad data, a non-finite loss) ends them all within moments, rank 0 with the
                // message that explains it; a rank that died leaves the others waiting in a collective: they are stopped.
                WaitAll(signalled ? InterruptGrace : FailureGrace);
                int stopped = StopAll();
                string how = signalled ? "was interrupted" : code == CollectiveWatchdog.ExitCode ? "timed out waiting for the others" : $"exited with code {code}";
                return new GroupOutcome(code, $"rank {failed.r} {how}; " + (stopped > 0 ? $"stopped the other {stopped} rank(s)" : "the other ranks had ended"));
            }
            if (_ranks.All(p => p.HasExited))
            {
                foreach (var p in _ranks) p.WaitForExit(); // drains the forwarded output
                return new GroupOutcome(0, null);
            }
            Thread.Sleep(100);
        }
    }

    void WaitAll(TimeSpan limit)
    {
        var deadline = DateTime.UtcNow + limit;
        foreach (var p in _ranks)
        {
            var left = deadline - DateTime.UtcNow;
            if (left > TimeSpan.Zero) p.WaitForExit(left);
        }
    }

    /// <summary>Kills the ranks still running (with their children) and waits for them; returns how many it killed.</summary>
    int StopAll()
    {
        int killed = 0;
        foreach (var p in _ranks.Where(p => !p.HasExited))
        {
            try { p.Kill(entireProcessTree: true); killed++; }
            catch (InvalidOperationException) { } // exited in between
        }
        foreach (var p in _ranks) p.WaitForExit(10_000);
        return killed;
    }

    [DllImport("libc", EntryPoint = "kill")] static extern int SysKill(int pid, int signal);

    /// <summary>Passes SIGTERM on to every running rank (each saves a checkpoint after its current step; the ranks agree on which).</summary>
    public void Terminate()
    {
        const int SigTerm = 15;
        foreach (var p in _ranks)
            try { if (!p.HasExited) SysKill(p.Id, SigTerm); }
            catch (InvalidOperationException) { }
    }
}
