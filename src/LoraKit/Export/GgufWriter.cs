using System.Text;

namespace LoraKit.Export;

/// <summary>ggml's tensor types that LoraKit writes (the numbers are ggml's <c>ggml_type</c>).</summary>
public enum GgmlType : uint
{
    /// <summary>32-bit float.</summary>
    F32 = 0,
    /// <summary>IEEE half.</summary>
    F16 = 1,
    /// <summary>Blocks of 32 weights: an fp16 scale, then 32 int8 (34 bytes).</summary>
    Q8_0 = 8,
    /// <summary>bfloat16.</summary>
    BF16 = 30,
}

/// <summary>The value types of GGUF metadata (gguf's <c>gguf_type</c>).</summary>
public enum GgufValueType : uint
{
    /// <summary>u8.</summary>
    UInt8 = 0,
    /// <summary>i8.</summary>
    Int8 = 1,
    /// <summary>u16.</summary>
    UInt16 = 2,
    /// <summary>i16.</summary>
    Int16 = 3,
    /// <summary>u32.</summary>
    UInt32 = 4,
    /// <summary>i32.</summary>
    Int32 = 5,
    /// <summary>f32.</summary>
    Float32 = 6,
    /// <summary>bool (one byte).</summary>
    Bool = 7,
    /// <summary>u64 length + UTF-8 bytes.</summary>
    String = 8,
    /// <summary>element type, u64 count, elements.</summary>
    Array = 9,
    /// <summary>u64.</summary>
    UInt64 = 10,
    /// <summary>i64.</summary>
    Int64 = 11,
    /// <summary>f64.</summary>
    Float64 = 12,
}

/// <summary>
/// Writes a GGUF v3 file as ggml's gguf.c reads it: magic, version, tensor and key-value counts, the key-values, the
/// tensor infos (name, dims innermost first, type, offset), then the tensor data, each tensor starting at a multiple of
/// <see cref="Alignment"/>. Metadata and tensors are collected first and written in one pass to a temporary file that is
/// renamed over <c>path</c> only when complete, so a failed export never leaves a file that looks whole.
/// </summary>
/// <remarks>No NuGet package LoraKit may use writes GGUF (LLamaSharp reads it through llama.cpp only), hence this writer.</remarks>
public sealed class GgufWriter
{
    /// <summary>gguf's default <c>general.alignment</c>.</summary>
    public const int Alignment = 32;

    readonly List<(string key, GgufValueType type, object value)> _kv = [];
    readonly List<(string name, long[] ne, GgmlType type, long size, Func<byte[]> data)> _tensors = [];

    /// <summary>Adds a string value.</summary>
    public void Add(string key, string value) => _kv.Add((key, GgufValueType.String, value));
    /// <summary>Adds a u32 value (gguf's counts and lengths).</summary>
    public void Add(string key, uint value) => _kv.Add((key, GgufValueType.UInt32, value));
    /// <summary>Adds an i32 value (token ids).</summary>
    public void AddInt32(string key, int value) => _kv.Add((key, GgufValueType.Int32, value));
    /// <summary>Adds an f32 value.</summary>
    public void Add(string key, float value) => _kv.Add((key, GgufValueType.Float32, value));
    /// <summary>Adds a bool value.</summary>
    public void Add(string key, bool value) => _kv.Add((key, GgufValueType.Bool, value));
    /// <summary>Adds an array of strings.</summary>
    public void Add(string key, IReadOnlyList<string> values) => _kv.Add((key, GgufValueType.Array, (GgufValueType.String, (object)values)));
    /// <summary>Adds an array of i32.</summary>
    public void Add(string key, IReadOnlyList<int> values) => _kv.Add((key, GgufValueType.Array, (GgufValueType.Int32, (object)values)));
    /// <summary>Adds an array of f32.</summary>
    public void Add(string key, IReadOnlyList<float> values) => _kv.Add((key, GgufValueType.Array, (GgufValueType.Float32, (object)values)));

    /// <summary>
    /// Adds a tensor: <paramref name="ne"/> is ggml's shape, innermost (contiguous) dimension first, i.e. a torch shape
    /// reversed; <paramref name="data"/> gives its bytes encoded as <paramref name="type"/> when <see cref="Save"/>
    /// reaches it, so only one tensor's encoding is held in memory at a time.
    /// </summary>
    public void AddTensor(string name, long[] ne, GgmlType type, Func<byte[]> data)
    {
        if (_tensors.Any(t => t.name == name)) throw new ArgumentException($"tensor '{name}' added twice");
        if (Encoding.UTF8.GetByteCount(name) >= 64) throw new ArgumentException($"tensor name '{name}' is longer than ggml's 63 bytes");
        _tensors.Add((name, ne, type, ByteSize(ne, type), data));
    }

    /// <summary>The encoded size of a tensor of shape <paramref name="ne"/> and type <paramref name="type"/>.</summary>
    public static long ByteSize(long[] ne, GgmlType type)
    {
        long n = ne.Aggregate(1L, (a, b) => checked(a * b));
        return type switch
        {
            GgmlType.F32 => n * 4,
            GgmlType.F16 or GgmlType.BF16 => n * 2,
            GgmlType.Q8_0 => n / GgufEncoding.Q8Block * (2 + GgufEncoding.Q8Block),
            _ => throw new ArgumentOutOfRangeException(nameof(type)),
        };
    }

    /// <summary>
    /// Writes the file: to <c>path.tmp</c>, flushed, then renamed to <paramref name="path"/>. <paramref name="progress"/>
    /// is called before each tensor is encoded and written, with (tensors done, tensors in all, its name), and at the end.
    /// </summary>
    public void Save(string path, Action<int, int, string>? progress = null)
    {
        var tmp = path + ".tmp";
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write))
            using (var w = new BinaryWriter(fs, Encoding.UTF8))
            {
                WriteHeader(w);
                Pad(w);
                int done = 0;
                foreach (var t in _tensors)
                {
                    progress?.Invoke(done++, _tensors.Count, t.name);
                    var bytes = t.data();
                    if (bytes.Length != t.size) throw new InvalidOperationException($"tensor '{t.name}' encoded to {bytes.Length} bytes, not {t.size}");
                    w.Write(bytes);
                    Pad(w);
                }
                progress?.Invoke(_tensors.Count, _tensors.Count, "");
                w.Flush();
                fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, path, overwrite: false);
        }
        catch
        {
            if (File.Exists(tmp)) File.Delete(tmp);
            throw;
        }
    }

    void WriteHeader(BinaryWriter w)
    {
        w.Write(Encoding.ASCII.GetBytes("GGUF"));
        w.Write(3u);
        w.Write((ulong)_tensors.Count);
        w.Write((ulong)_kv.Count);
        foreach (var (key, type, value) in _kv)
        {
            WriteString(w, key);
            w.Write((uint)type);
            WriteValue(w, type, value);
        }
        ulong offset = 0;
        foreach (var (name, ne, type, size, _) in _tensors)
        {
            WriteString(w, name);
            w.Write((uint)ne.Length);
            foreach (var d in ne) w.Write((ulong)d);
            w.Write((uint)type);
            w.Write(offset);
            offset += (ulong)Padded(size);
        }
    }

    static void WriteValue(BinaryWriter w, GgufValueType type, object value)
    {
        switch (type)
        {
            case GgufValueType.String: WriteString(w, (string)value); break;
            case GgufValueType.UInt32: w.Write((uint)value); break;
            case GgufValueType.Int32: w.Write((int)value); break;
            case GgufValueType.Float32: w.Write((float)value); break;
            case GgufValueType.Bool: w.Write((byte)((bool)value ? 1 : 0)); break;
            case GgufValueType.Array:
                var (elem, items) = ((GgufValueType, object))value;
                w.Write((uint)elem);
                switch (items)
                {
                    case IReadOnlyList<string> s: w.Write((ulong)s.Count); foreach (var x in s) WriteString(w, x); break;
                    case IReadOnlyList<int> i: w.Write((ulong)i.Count); foreach (var x in i) w.Write(x); break;
                    case IReadOnlyList<float> f: w.Write((ulong)f.Count); foreach (var x in f) w.Write(x); break;
                    default: throw new ArgumentException($"unsupported array {items.GetType()}");
                }
                break;
            default: throw new ArgumentException($"unsupported value type {type}");
        }
    }

    static void WriteString(BinaryWriter w, string s)
    {
        var bytes = Encoding.UTF8.GetBytes(s);
        w.Write((ulong)bytes.Length);
        w.Write(bytes);
    }

    static long Padded(long n) => (n + Alignment - 1) / Alignment * Alignment;

    static void Pad(BinaryWriter w)
    {
        long pos = w.BaseStream.Position;
        for (long i = pos; i < Padded(pos); i++) w.Write((byte)0);
    }
}
