namespace LoraKit.Export;

/// <summary>A model, adapter, tokenizer or output path that cannot be written as GGUF, with a one-line reason.</summary>
public sealed class GgufExportException(string message) : LoraKitException(message);
