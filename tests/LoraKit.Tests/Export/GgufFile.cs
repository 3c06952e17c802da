using System.Text;
using LoraKit.Export;

namespace LoraKit.Tests.Export;

/// <summary>
/// A small GGUF v3 reader for the tests, written from the format (ggml's gguf.c), not from <see cref="GgufWriter"/>:
/// metadata as .NET values (arrays as object[]), tensor infos, and each tensor's bytes. It checks what llama.cpp
/// checks on load: magic, version, that offsets are aligned and that the data fits the file.
/// </summary>
public sealed class GgufFile
{
    public sealed record TensorInfo(string Name, long[] Ne, GgmlType Type, long Offset);

    public uint Version { get; private init; }
    public Dictionary<string, object> Metadata { get; } = new(StringComparer.Ordinal);
    public Dictionary<string, TensorInfo> Tensors { get; } = new(StringComparer.Ordinal);
    public long DataStart { get; private set; }
    readonly byte[] _bytes;

    GgufFile(byte[] bytes) { _bytes = bytes; }

    public static GgufFile Read(string path)
    {
        var bytes = File.ReadAllBytes(path);
        var r = new BinaryReader(new MemoryStream(bytes), Encoding.UTF8);
        Assert.Equal("GGUF", Encoding.ASCII.GetString(r.ReadBytes(4)));
        var f = new GgufFile(bytes) { Version = r.ReadUInt32() };
        long tensors = (long)r.ReadUInt64(), kvs = (long)r.ReadUInt64();
        for (long i = 0; i < kvs; i++)
        {
            var key = Str(r);
            f.Metadata[key] = Value(r, r.ReadUInt32());
        }
        for (long i = 0; i < tensors; i++)
        {
            var name = Str(r);
            var ne = new long[r.ReadUInt32()];
            for (int d = 0; d < ne.Length; d++) ne[d] = (long)r.ReadUInt64();
            f.Tensors[name] = new TensorInfo(name, ne, (GgmlType)r.ReadUInt32(), (long)r.ReadUInt64());
        }
        long align = f.Metadata.TryGetValue("general.alignment", out var a) ? Convert.ToInt64(a) : 32;
        f.DataStart = (r.BaseStream.Position + align - 1) / align * align;
        foreach (var t in f.Tensors.Values)
        {
            Assert.True(t.Offset % align == 0, $"tensor {t.Name} at offset {t.Offset}, not a multiple of {align}");
            Assert.True(f.DataStart + t.Offset + ByteSize(t) <= bytes.Length, $"tensor {t.Name} runs past the end of the file");
        }
        return f;
    }

    /// <summary>A tensor's values as float32 (F32, F16, BF16 and Q8_0 dequantized), innermost dimension fastest.</summary>
    public float[] Floats(string name)
    {
        var t = Tensors[name];
        var data = _bytes.AsSpan((int)(DataStart + t.Offset), (int)ByteSize(t));
        long n = t.Ne.Aggregate(1L, (x, y) => x * y);
        var values = new float[n];
        for (long i = 0; i < n; i++)
        {
            values[i] = t.Type switch
            {
                GgmlType.F32 => BitConverter.ToSingle(data[(int)(i * 4)..]),
                GgmlType.F16 => (float)BitConverter.ToHalf(data[(int)(i * 2)..]),
                GgmlType.BF16 => BitConverter.UInt32BitsToSingle((uint)BitConverter.ToUInt16(data[(int)(i * 2)..]) << 16),
                GgmlType.Q8_0 => (float)BitConverter.ToHalf(data[(int)(i / 32 * 34)..]) * (sbyte)data[(int)(i / 32 * 34 + 2 + i % 32)],
                _ => throw new NotSupportedException(t.Type.ToString()),
            };
        }
        return values;
    }

    static long ByteSize(TensorInfo t)
    {
        long n = t.Ne.Aggregate(1L, (x, y) => x * y);
        return t.Type switch { GgmlType.F32 => n * 4, GgmlType.F16 or GgmlType.BF16 => n * 2, GgmlType.Q8_0 => n / 32 * 34, _ => throw new NotSupportedException(t.Type.ToString()) };
    }

    static string Str(BinaryReader r) => Encoding.UTF8.GetString(r.ReadBytes(checked((int)r.ReadUInt64())));

    static object Value(BinaryReader r, uint type) => type switch
    {
        0 => r.ReadByte(), 1 => r.ReadSByte(), 2 => r.ReadUInt16(), 3 => r.ReadInt16(), 4 => r.ReadUInt32(), 5 => r.ReadInt32(),
        6 => r.ReadSingle(), 7 => r.ReadByte() != 0, 8 => Str(r), 10 => r.ReadUInt64(), 11 => r.ReadInt64(), 12 => r.ReadDouble(),
        9 => Array(r),
        _ => throw new InvalidDataException($"unknown GGUF value type {type}"),
    };

    static object[] Array(BinaryReader r)
    {
        uint elem = r.ReadUInt32();
        var items = new object[checked((int)r.ReadUInt64())];
        for (int i = 0; i < items.Length; i++) items[i] = Value(r, elem);
        return items;
    }
}
