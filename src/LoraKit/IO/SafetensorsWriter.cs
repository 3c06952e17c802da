using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraKit.IO;

/// <summary>Writes tensors as one safetensors file (keys sorted, 8-byte aligned header), atomically via a temp file.</summary>
internal static class SafetensorsWriter
{
    public static void Save(string path, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var scope = torch.NewDisposeScope(); // the CPU copies below are temporaries
        var names = tensors.Keys.OrderBy(k => k, StringComparer.Ordinal).ToList();
        var header = new Dictionary<string, object>();
        if (metadata is { Count: > 0 }) header["__metadata__"] = metadata;
        long offset = 0;
        var cpu = new List<Tensor>();
        foreach (var name in names)
        {
            var t = tensors[name].detach().cpu().contiguous();
            cpu.Add(t);
            long n = t.NumberOfElements * t.element_size();
            header[name] = new { dtype = DTypes.ToName(t.dtype), shape = t.shape, data_offsets = new[] { offset, offset + n } };
            offset += n;
        }
        var json = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(header));
        int pad = (8 - json.Length % 8) % 8;
        var headerBytes = new byte[json.Length + pad];
        json.CopyTo(headerBytes, 0);
        for (int i = json.Length; i < headerBytes.Length; i++) headerBytes[i] = (byte)' ';

        var tmp = path + ".tmp";
        using (var fs = new FileStream(tmp, FileMode.Create, FileAccess.Write))
        {
            fs.Write(BitConverter.GetBytes((ulong)headerBytes.Length));
            fs.Write(headerBytes);
            foreach (var t in cpu)
            {
                if (t.NumberOfElements > 0) t.WriteBytesToStream(fs);
                t.Dispose();
            }
            fs.Flush(flushToDisk: true);
        }
        File.Move(tmp, path, overwrite: true);
    }
}
