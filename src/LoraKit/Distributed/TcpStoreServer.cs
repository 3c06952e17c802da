using System.Net;
using System.Net.Sockets;

namespace LoraKit.Distributed;

/// <summary>
/// The serving half of <see cref="TcpStore"/>, run by rank 0: a key-value map behind a TCP port, one thread per
/// connected rank. Every request and reply is one length-prefixed frame (<see cref="TcpStore.MaxFrameBytes"/> at most,
/// so a stray client cannot make it allocate without bound). A value may be set to vanish after a given number of
/// reads (the CPU all-reduce's contributions do), so the map does not grow with the steps of a run.
/// </summary>
public sealed class TcpStoreServer : IDisposable
{
    internal const byte OpSet = 1, OpGet = 2, OpAdd = 3;

    readonly TcpListener _listener;
    readonly Dictionary<string, (byte[] value, int readersLeft)> _map = [];
    readonly List<TcpClient> _clients = [];
    readonly Thread _accept;
    volatile bool _stopped;

    TcpStoreServer(TcpListener listener)
    {
        _listener = listener;
        _accept = new Thread(AcceptLoop) { IsBackground = true, Name = "lorakit-store" };
        _accept.Start();
    }

    /// <summary>The port it listens on (the one asked for, or the one the system chose for 0).</summary>
    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    /// <summary>Listens on every interface at <paramref name="port"/> (0: a free one); a port in use is a one-line error.</summary>
    public static TcpStoreServer Start(int port)
    {
        var listener = new TcpListener(IPAddress.Any, port);
        try { listener.Start(); }
        catch (SocketException e) { throw new DistributedEnvException($"MASTER_PORT={port}: rank 0 cannot listen there ({e.SocketErrorCode}); choose a free port", e); }
        return new TcpStoreServer(listener);
    }

    void AcceptLoop()
    {
        while (!_stopped)
        {
            TcpClient client;
            try { client = _listener.AcceptTcpClient(); }
            catch (Exception) when (_stopped) { return; }
            catch (SocketException) { continue; }
            client.NoDelay = true;
            lock (_clients) _clients.Add(client);
            new Thread(() => Serve(client)) { IsBackground = true, Name = "lorakit-store-client" }.Start();
        }
    }

    void Serve(TcpClient client)
    {
        try
        {
            using var stream = client.GetStream();
            while (!_stopped && TcpStore.ReadFrame(stream) is byte[] request)
                TcpStore.WriteFrame(stream, Handle(request));
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException or InvalidDataException) { }
        finally
        {
            lock (_clients) _clients.Remove(client);
            client.Dispose();
        }
    }

    byte[] Handle(byte[] request)
    {
        using var reader = new BinaryReader(new MemoryStream(request));
        byte op = reader.ReadByte();
        string key = TcpStore.ReadKey(reader);
        switch (op)
        {
            case OpSet:
            {
                int readers = reader.ReadInt32();
                var value = reader.ReadBytes(request.Length - (int)reader.BaseStream.Position);
                lock (_map) { _map[key] = (value, readers); Monitor.PulseAll(_map); }
                return [0];
            }
            case OpGet:
            {
                int waitMs = reader.ReadInt32();
                var deadline = DateTime.UtcNow.AddMilliseconds(waitMs);
                lock (_map)
                {
                    while (!_map.ContainsKey(key))
                    {
                        var left = deadline - DateTime.UtcNow;
                        if (left <= TimeSpan.Zero || _stopped) return [1];
                        Monitor.Wait(_map, left);
                    }
                    var (value, readers) = _map[key];
                    if (readers == 1) _map.Remove(key);
                    else if (readers > 1) _map[key] = (value, readers - 1);
                    return [0, .. value];
                }
            }
            case OpAdd:
            {
                long delta = reader.ReadInt64();
                lock (_map)
                {
                    long now = (_map.TryGetValue(key, out var v) && v.value.Length == 8 ? BitConverter.ToInt64(v.value) : 0) + delta;
                    _map[key] = (BitConverter.GetBytes(now), 0);
                    Monitor.PulseAll(_map);
                    return BitConverter.GetBytes(now);
                }
            }
            default: throw new InvalidDataException($"unknown store operation {op}");
        }
    }

    /// <summary>Stops listening and drops every connection (a waiting client sees its connection close).</summary>
    public void Dispose()
    {
        _stopped = true;
        _listener.Stop();
        lock (_map) Monitor.PulseAll(_map);
        lock (_clients) foreach (var c in _clients) c.Dispose();
    }
}
