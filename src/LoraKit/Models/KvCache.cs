using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>Keys and values of past positions, per layer, each [B, kv_heads, S, head_dim].</summary>
public sealed class KvCache : IDisposable
{
    readonly Tensor?[] _k, _v;

    public KvCache(int layers) { _k = new Tensor?[layers]; _v = new Tensor?[layers]; }

    /// <summary>Number of cached positions.</summary>
    public long Length => _k[0]?.shape[2] ?? 0;

    /// <summary>Appends this step's keys/values for one layer and returns the full sequence so far.</summary>
    public (Tensor k, Tensor v) Append(int layer, Tensor k, Tensor v)
    {
        var oldK = _k[layer];
        var oldV = _v[layer];
        var newK = oldK is null ? k.alias() : cat([oldK, k], 2);
        var newV = oldV is null ? v.alias() : cat([oldV, v], 2);
        newK.DetachFromDisposeScope();
        newV.DetachFromDisposeScope();
        oldK?.Dispose();
        oldV?.Dispose();
        _k[layer] = newK;
        _v[layer] = newV;
        return (newK, newV);
    }

    /// <summary>Keeps only the given batch rows (finished requests leave the batch).</summary>
    public void SelectRows(Tensor rows) => Replace(t => t.index_select(0, rows));

    void Replace(Func<Tensor, Tensor> f)
    {
        for (int i = 0; i < _k.Length; i++)
        {
            if (_k[i] is null) continue;
            var k = f(_k[i]!).DetachFromDisposeScope();
            var v = f(_v[i]!).DetachFromDisposeScope();
            _k[i]!.Dispose(); _v[i]!.Dispose();
            _k[i] = k; _v[i] = v;
        }
    }

    public void Dispose()
    {
        foreach (var t in _k) t?.Dispose();
        foreach (var t in _v) t?.Dispose();
        Array.Clear(_k);
        Array.Clear(_v);
    }
}
