using static TorchSharp.torch;

namespace LoraKit.IO;

/// <summary>Mapping between safetensors dtype names and TorchSharp scalar types.</summary>
internal static class DTypes
{
    /// <summary>Element size in bytes of every dtype the safetensors format defines; null when unknown.</summary>
    public static int? SizeOf(string dtype) => dtype switch
    {
        "F64" or "I64" or "U64" => 8,
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "I8" or "U8" or "BOOL" or "F8_E4M3" or "F8_E5M2" => 1,
        _ => null,
    };

    /// <summary>The TorchSharp type a stored dtype loads as; null for dtypes LoraKit cannot compute with.</summary>
    public static ScalarType? ToScalarType(string dtype) => dtype switch
    {
        "F64" => ScalarType.Float64,
        "F32" => ScalarType.Float32,
        "F16" => ScalarType.Float16,
        "BF16" => ScalarType.BFloat16,
        "I64" => ScalarType.Int64,
        "I32" => ScalarType.Int32,
        "I16" => ScalarType.Int16,
        "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte,
        "BOOL" => ScalarType.Bool,
        _ => null,
    };

    public static string ToName(ScalarType t) => t switch
    {
        ScalarType.Float64 => "F64",
        ScalarType.Float32 => "F32",
        ScalarType.Float16 => "F16",
        ScalarType.BFloat16 => "BF16",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Int16 => "I16",
        ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8",
        ScalarType.Bool => "BOOL",
        _ => throw new ArgumentException($"dtype {t} cannot be stored in safetensors"),
    };

    /// <summary>Parses a user-facing dtype name (fp32, float32, bf16, bfloat16, fp16, float16).</summary>
    public static ScalarType Parse(string name) => name.ToLowerInvariant() switch
    {
        "fp32" or "float32" or "f32" or "float" => ScalarType.Float32,
        "bf16" or "bfloat16" => ScalarType.BFloat16,
        "fp16" or "float16" or "f16" or "half" => ScalarType.Float16,
        _ => throw new ArgumentException($"unknown dtype '{name}' (expected fp32, bf16 or fp16)"),
    };
}
