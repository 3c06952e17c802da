using System.Net.Sockets;
using System.Text;

namespace LoraKit.Distributed;

/// <summary>
/// A small key-value store over TCP at MASTER_ADDR:MASTER_PORT, as torch.distributed's TCPStore: rank 0 serves it
/// (<see cref="TcpStoreServer"/>), every rank (rank 0 too) is a client. It bootstraps the group — rank 0 publishes the
/// NCCL unique id, the others wait for it — and carries barriers and the CPU backend's all-reduce. Every wait has a
/// deadline: a rank that never arrives is a one-line <see cref="DistributedEnvException"/>, never a hang.
/// Requests on one client are serialised (one connection, one request in flight).
/// </summary>
public sealed class TcpStore : IDisposable
{
    /// <summary>The largest frame either side sends or accepts (a value plus a few bytes of header).</summary>
    public const int MaxFrameBytes = 64 << 20;
    /// <summary>The longest key, in UTF-8 bytes.</summary>
    public const int MaxKeyBytes = 1024;

    readonly TcpClient _client;
    readonly NetworkStream _stream;
    readonly TcpStoreServer? _server;
    readonly string _where;
    readonly object _gate = new();

    /// <summary>How long <see cref="Get"/> and <see cref="Barrier"/> wait by default.</summary>
    public TimeSpan Timeout { get; }

    TcpStore(TcpClient client, TcpStoreServer? server, string where, TimeSpan timeout)
    {
        (_client, _server, _where, Timeout) = (client, server, where, timeout);
        _stream = client.GetStream();
    }

    /// <summary>
    /// Connects to the store at <paramref name="host"/>:<paramref name="port"/>, retrying until <paramref name="timeout"/>
    /// (rank 0 may start later than the others); with <paramref name="serve"/> (rank 0) it first starts the server there.
    /// </summary>
    public static TcpStore Connect(string host, int port, TimeSpan timeout, bool serve = false)
    {
        var server = serve ? TcpStoreServer.Start(port) : null;
        if (server is not null) port = server.Port;
        string where = $"{host}:{port}";
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var client = new TcpClient { NoDelay = true };
            try
            {
                client.Connect(serve ? "127.0.0.1" : host, port);
                return new TcpStore(client, server, where, timeout);
            }
            catch (SocketException e)
            {
                client.Dispose();
                if (DateTime.UtcNow >= deadline)
                {
                    server?.Dispose();
                    throw new DistributedEnvException($"MASTER_ADDR:MASTER_PORT {where}: no store answered within {timeout.TotalSeconds:G3} s ({e.SocketErrorCode}); is rank 0 running?", e);
                }
                Thread.Sleep(100);
            }
        }
    }

    /// <summary>The port the store serves on (rank 0's own client only; 0 for the others).</summary>
    public int ServedPort => _server?.Port ?? 0;

    /// <summary>Sets <paramref name="key"/>; with <paramref name="readers"/> &gt; 0 the value is deleted after that many <see cref="Get"/>s.</summary>
    public void Set(string key, byte[] value, int readers = 0)
    {
        if (value.Length > MaxFrameBytes - MaxKeyBytes - 16) throw new ArgumentException($"store value for '{key}' is {value.Length:N0} bytes; the store carries at most {MaxFrameBytes - MaxKeyBytes - 16:N0}");
        Request(w => { w.Write(TcpStoreServer.OpSet); WriteKey(w, key); w.Write(readers); w.Write(value); }, TimeSpan.Zero);
    }

    /// <summary>The value of <paramref name="key"/>, waiting up to <paramref name="wait"/> (default <see cref="Timeout"/>) for a rank to set it.</summary>
    public byte[] Get(string key, TimeSpan? wait = null)
    {
        var w = wait ?? Timeout;
        var reply = Request(x => { x.Write(TcpStoreServer.OpGet); WriteKey(x, key); x.Write((int)Math.Min(int.MaxValue, w.TotalMilliseconds)); }, w);
        if (reply[0] != 0) throw new DistributedEnvException($"store {_where}: '{key}' did not arrive within {w.TotalSeconds:G3} s (a rank died or never joined)");
        return reply[1..];
    }

    /// <summary>Adds <paramref name="delta"/> to the counter <paramref name="key"/> (0 when new) and returns its new value.</summary>
    public long Add(string key, long delta) =>
        BitConverter.ToInt64(Request(w => { w.Write(TcpStoreServer.OpAdd); WriteKey(w, key); w.Write(delta); }, TimeSpan.Zero));

    /// <summary>Returns once all <paramref name="world"/> ranks reached the barrier <paramref name="name"/>, or throws naming how many did.</summary>
    public void Barrier(string name, int world, TimeSpan? wait = null)
    {
        string key = $"barrier/{name}";
        if (Add(key, 1) == world) Set(key + "/open", [1], readers: world);
        try { Get(key + "/open", wait); }
        catch (DistributedEnvException e)
        {
            long arrived = Add(key, 0);
            throw new DistributedEnvException($"barrier '{name}': {arrived} of {world} ranks arrived within {(wait ?? Timeout).TotalSeconds:G3} s (a rank died or never joined)", e);
        }
    }

    byte[] Request(Action<BinaryWriter> write, TimeSpan serverWait)
    {
        var body = new MemoryStream();
        using (var w = new BinaryWriter(body, Encoding.UTF8, leaveOpen: true)) write(w);
        lock (_gate)
        {
            // The server answers a wait within its deadline; a dead server must not leave this read blocked for ever.
            _client.ReceiveTimeout = (int)Math.Min(int.MaxValue, (serverWait + TimeSpan.FromSeconds(30)).TotalMilliseconds);
            try
            {
                WriteFrame(_stream, body.ToArray());
                return ReadFrame(_stream) ?? throw new IOException("connection closed");
            }
            catch (Exception e) when (e is IOException or SocketException or InvalidDataException)
            {
                throw new DistributedEnvException($"store {_where}: lost the connection to rank 0's store ({e.Message})", e);
            }
        }
    }

    internal static void WriteKey(BinaryWriter w, string key)
    {
        var bytes = Encoding.UTF8.GetBytes(key);
        if (bytes.Length > MaxKeyBytes) throw new ArgumentException($"store key of {bytes.Length} bytes; at most {MaxKeyBytes}");
        w.Write(bytes.Length);
        w.Write(bytes);
    }

    internal static string ReadKey(BinaryReader r)
    {
        int n = r.ReadInt32();
        if (n < 0 || n > MaxKeyBytes) throw new InvalidDataException($"store key of {n} bytes");
        return Encoding.UTF8.GetString(r.ReadBytes(n));
    }

    internal static void WriteFrame(Stream s, byte[] payload)
    {
        s.Write(BitConverter.GetBytes(payload.Length));
        s.Write(payload);
    }

    /// <summary>One frame, or null when the peer closed the connection cleanly before a new one.</summary>
    internal static byte[]? ReadFrame(Stream s)
    {
        var head = new byte[4];
        if (!ReadExactly(s, head, allowEof: true)) return null;
        int n = BitConverter.ToInt32(head);
        if (n < 0 || n > MaxFrameBytes) throw new InvalidDataException($"store frame of {n} bytes (at most {MaxFrameBytes})");
        var payload = new byte[n];
        ReadExactly(s, payload, allowEof: false);
        return payload;
    }

    static bool ReadExactly(Stream s, byte[] buffer, bool allowEof)
    {
        int done = 0;
        while (done < buffer.Length)
        {
            int k = s.Read(buffer, done, buffer.Length - done);
            if (k == 0)
            {
                if (allowEof && done == 0) return false;
                throw new IOException("connection closed mid-frame");
            }
            done += k;
        }
        return true;
    }

    /// <summary>Closes the connection; rank 0's store stops serving.</summary>
    public void Dispose()
    {
        _client.Dispose();
        _server?.Dispose();
    }
}
