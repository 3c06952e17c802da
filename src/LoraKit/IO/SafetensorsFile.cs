using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.IO;

/// <summary>One tensor's entry in a safetensors header: dtype, shape and its byte range in the data buffer.</summary>
public sealed record SafetensorsEntry(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long ByteCount => End - Begin;
}

/// <summary>
/// A validated, memory-mapped safetensors file. The header is checked the way the safetensors reference does
/// (length cap, UTF-8 JSON, known dtypes, byte size = shape × dtype size with overflow checks, offsets contiguous,
/// in bounds and covering the whole data buffer); every failure is a <see cref="SafetensorsException"/> naming the
/// file. Tensor bytes are copied from the mapping straight into TorchSharp tensors, never read twice.
/// </summary>
public sealed class SafetensorsFile : IDisposable
{
    /// <summary>The reference implementation refuses headers over 100 MB.</summary>
    public const long MaxHeaderBytes = 100_000_000;

    readonly MemoryMappedFile? _map;
    readonly MemoryMappedViewAccessor? _view;
    readonly long _dataStart;

    public string Path { get; }
    public IReadOnlyDictionary<string, SafetensorsEntry> Entries { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    SafetensorsFile(string path, MemoryMappedFile? map, MemoryMappedViewAccessor? view, long dataStart,
        Dictionary<string, SafetensorsEntry> entries, Dictionary<string, string> metadata)
    {
        Path = path; _map = map; _view = view; _dataStart = dataStart; Entries = entries; Metadata = metadata;
    }

    public static SafetensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new SafetensorsException(path, "file not found");
        long fileLength;
        byte[] header;
        // The length comes from the opened stream, not FileInfo: in the Hugging Face cache layout the file is a symlink
        // into blobs/, and FileInfo.Length is the link's own size.
        FileStream OpenRead()
        {
            try { return File.OpenRead(path); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new SafetensorsException(path, FileProblem.Describe(path, e));
            }
        }
        using (var fs = OpenRead())
        {
            fileLength = fs.Length;
            if (fileLength < 8) throw new SafetensorsException(path, $"file is {fileLength} bytes, too short for the 8-byte header length");
            Span<byte> lenBytes = stackalloc byte[8];
            fs.ReadExactly(lenBytes);
            ulong headerLen = BitConverter.ToUInt64(lenBytes);
            if (headerLen > MaxHeaderBytes)
                throw new SafetensorsException(path, $"header length {headerLen} exceeds the {MaxHeaderBytes}-byte limit");
            if (headerLen > (ulong)(fileLength - 8))
                throw new SafetensorsException(path, $"header length {headerLen} is larger than the file ({fileLength} bytes); the file may be truncated");
            header = new byte[headerLen];
            fs.ReadExactly(header);
        }
        long dataStart = 8 + header.Length;
        long dataLength = fileLength - dataStart;
        var (entries, metadata) = ParseHeader(path, header, dataLength);

        if (dataLength == 0) return new SafetensorsFile(path, null, null, dataStart, entries, metadata);
        var map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        var view = map.CreateViewAccessor(0, fileLength, MemoryMappedFileAccess.Read);
        return new SafetensorsFile(path, map, view, dataStart, entries, metadata);
    }

    static (Dictionary<string, SafetensorsEntry>, Dictionary<string, string>) ParseHeader(string path, byte[] header, long dataLength)
    {
        string json;
        try { json = new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(header); }
        catch (DecoderFallbackException) { throw new SafetensorsException(path, "header is not valid UTF-8"); }

        JsonDocument doc;
        try { doc = JsonDocument.Parse(json, JsonFiles.Options); }
        catch (JsonException e) { throw new SafetensorsException(path, $"header is not valid JSON ({JsonFiles.Describe(e)})"); }

        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new SafetensorsException(path, "header JSON is not an object");
            var entries = new Dictionary<string, SafetensorsEntry>(StringComparer.Ordinal);
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var prop in doc.RootElement.EnumerateObject())
            {
                if (prop.Name == "__metadata__")
                {
                    if (prop.Value.ValueKind != JsonValueKind.Object)
                        throw new SafetensorsException(path, "__metadata__ is not an object");
                    foreach (var m in prop.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String)
                            throw new SafetensorsException(path, $"__metadata__ value '{m.Name}' is not a string");
                        metadata[m.Name] = m.Value.GetString()!;
                    }
                    continue;
                }
                entries[prop.Name] = ParseEntry(path, prop.Name, prop.Value);
            }

            // Offsets must tile the data buffer exactly: sorted by start, each begins where the last ended.
            long expected = 0;
            foreach (var e in entries.Values.OrderBy(e => e.Begin).ThenBy(e => e.End))
            {
                if (e.Begin != expected)
                    throw new SafetensorsException(path, e.Begin < expected
                        ? $"tensor '{e.Name}' overlaps the previous tensor (starts at {e.Begin}, previous ends at {expected})"
                        : $"gap before tensor '{e.Name}' (starts at {e.Begin}, expected {expected})");
                expected = e.End;
            }
            if (expected > dataLength)
                throw new SafetensorsException(path, $"tensor data ends at byte {expected} but the data buffer holds only {dataLength} bytes; the file is truncated");
            if (expected != dataLength)
                throw new SafetensorsException(path, $"data buffer has {dataLength - expected} trailing bytes not covered by any tensor");
            return (entries, metadata);
        }
    }

    static SafetensorsEntry ParseEntry(string path, string name, JsonElement v)
    {
        if (v.ValueKind != JsonValueKind.Object) throw new SafetensorsException(path, $"entry '{name}' is not an object");
        if (!v.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String)
            throw new SafetensorsException(path, $"tensor '{name}' has no dtype");
        string dtype = dt.GetString()!;
        int elemSize = DTypes.SizeOf(dtype) ?? throw new SafetensorsException(path, $"tensor '{name}' has unsupported dtype '{dtype}'");
        if (!v.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array)
            throw new SafetensorsException(path, $"tensor '{name}' has no shape");
        if (!v.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new SafetensorsException(path, $"tensor '{name}' has no [begin, end] data_offsets");

        var shape = new long[sh.GetArrayLength()];
        long count = 1;
        int i = 0;
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long dim) || dim < 0)
                throw new SafetensorsException(path, $"tensor '{name}' has an invalid dimension in its shape");
            shape[i++] = dim;
            try { count = checked(count * dim); }
            catch (OverflowException) { throw new SafetensorsException(path, $"tensor '{name}' shape overflows when multiplied out"); }
        }
        var offsets = off.EnumerateArray().Select(o =>
            o.ValueKind == JsonValueKind.Number && o.TryGetInt64(out long x) && x >= 0
                ? x : throw new SafetensorsException(path, $"tensor '{name}' has an invalid data offset")).ToArray();
        long begin = offsets[0], end = offsets[1];
        if (end < begin) throw new SafetensorsException(path, $"tensor '{name}' ends (at {end}) before it begins (at {begin})");
        long bytes;
        try { bytes = checked(count * elemSize); }
        catch (OverflowException) { throw new SafetensorsException(path, $"tensor '{name}' byte size overflows"); }
        if (end - begin != bytes)
            throw new SafetensorsException(path, $"tensor '{name}' has {end - begin} bytes but its shape [{string.Join(", ", shape)}] × {dtype} needs {bytes}");
        return new SafetensorsEntry(name, dtype, shape, begin, end);
    }

    /// <summary>Copies one tensor out of the mapping into a new CPU tensor of its stored dtype.</summary>
    public Tensor Read(string name)
    {
        if (!Entries.TryGetValue(name, out var e)) throw new SafetensorsException(Path, $"no tensor named '{name}'");
        var scalar = DTypes.ToScalarType(e.DType) ?? throw new SafetensorsException(Path, $"tensor '{name}' dtype {e.DType} cannot be loaded");
        var t = torch.empty(e.Shape, scalar, device: CPU);
        if (e.ByteCount == 0) return t;
        CopyInto(t, e);
        return t;
    }

    /// <summary>
    /// Up to <paramref name="count"/> evenly spaced elements of one tensor, in its stored dtype, read straight from the
    /// mapping without copying the rest (cheap on a multi-GB tensor; used to fingerprint a base model).
    /// </summary>
    public unsafe Tensor ReadSample(string name, int count)
    {
        if (!Entries.TryGetValue(name, out var e)) throw new SafetensorsException(Path, $"no tensor named '{name}'");
        var scalar = DTypes.ToScalarType(e.DType) ?? throw new SafetensorsException(Path, $"tensor '{name}' dtype {e.DType} cannot be loaded");
        long elem = DTypes.SizeOf(e.DType)!.Value, n = e.ByteCount / elem;
        int k = (int)Math.Min(count, n);
        var t = torch.empty([k], scalar, device: CPU);
        if (k == 0) return t;
        var bytes = new byte[k * elem];
        byte* basePtr = null;
        _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* src = basePtr + _view.PointerOffset + _dataStart + e.Begin;
            for (int i = 0; i < k; i++)
                new Span<byte>(src + (i * n / k) * elem, (int)elem).CopyTo(bytes.AsSpan(i * (int)elem));
        }
        finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
        t.bytes = bytes;
        return t;
    }

    unsafe void CopyInto(Tensor t, SafetensorsEntry e)
    {
        byte* basePtr = null;
        _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* src = basePtr + _view.PointerOffset + _dataStart + e.Begin;
            // Tensors may exceed a Span's 2 GiB: copy in chunks into a flat byte view of the destination.
            using var flat = t.view(-1);
            long elem = t.element_size();
            long elemsPerChunk = Math.Max(1, (1L << 30) / elem);
            for (long start = 0; start < flat.shape[0]; start += elemsPerChunk)
            {
                long n = Math.Min(elemsPerChunk, flat.shape[0] - start);
                using var chunk = flat.narrow(0, start, n);
                chunk.bytes = new Span<byte>(src + start * elem, checked((int)(n * elem)));
            }
        }
        finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
    }

    public void Dispose()
    {
        _view?.Dispose();
        _map?.Dispose();
    }
}

/// <summary>A .safetensors file that cannot be read (bad header, offsets or dtype); <see cref="FilePath"/> names the file
/// and <see cref="Problem"/> says what is wrong with it.</summary>
public sealed class SafetensorsException(string path, string problem)
    : LoraKitException($"{path}: {problem}")
{
    public string FilePath { get; } = path;
    public string Problem { get; } = problem;
}
