using System.Security.Cryptography;
using System.Text;

namespace LoraKit.Lora;

/// <summary>
/// An adapter's content hash: sha256 over the files that define it — adapter_config.json, adapter_model.safetensors
/// and, for a classification adapter, labels.json — each as its name, length and bytes, in that order. Other files in
/// the folder (a README, training logs) do not change it; any change to the config, weights or labels does. Evaluation
/// reports, the merge gate and the registry name adapters by it. Each file must be a regular file (a named pipe is
/// refused in bounded time) and is hashed for exactly the length it reports, so a device such as /dev/zero linked in
/// its place cannot make the hash read forever.
/// </summary>
public static class AdapterDigest
{
    static readonly TimeSpan OpenTimeout = TimeSpan.FromSeconds(5);
    /// <summary>The files that define an adapter, in hashing order (labels.json only for classification adapters).</summary>
    public static readonly IReadOnlyList<string> Files = [AdapterFiles.ConfigFile, AdapterFiles.WeightsFile, AdapterFiles.LabelsFile];

    /// <summary>The hex sha256 of the adapter in <paramref name="dir"/>.</summary>
    public static string Compute(string dir)
    {
        if (!Directory.Exists(dir)) throw new LoraKitException($"adapter directory '{dir}' does not exist");
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        hash.AppendData(Encoding.UTF8.GetBytes("lorakit-adapter/1\n"));
        foreach (var name in Files)
        {
            var path = Path.Combine(dir, name);
            if (!File.Exists(path))
            {
                if (name == AdapterFiles.LabelsFile) continue;
                throw new LoraKitException($"{dir}: no {name}; not a PEFT adapter directory");
            }
            using var f = IO.FileProblem.OpenPromptly(path, OpenTimeout);
            long length = f.Length;
            hash.AppendData(Encoding.UTF8.GetBytes($"{name} {length}\n"));
            var buffer = new byte[1 << 20];
            for (long left = length; left > 0;)
            {
                int n;
                try { n = f.Read(buffer, 0, (int)Math.Min(buffer.Length, left)); }
                catch (IOException e) { throw new LoraKitException($"{path}: {IO.FileProblem.Describe(path, e)}"); }
                if (n == 0) throw new LoraKitException($"{path}: ended after {length - left:N0} of {length:N0} bytes (changed while being read?)");
                hash.AppendData(buffer, 0, n);
                left -= n;
            }
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }
}
