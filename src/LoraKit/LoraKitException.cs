namespace LoraKit;

/// <summary>
/// A problem with the user's input (a file, a field, an option, a request) that LoraKit detected and explained.
/// Its message is one line that names the file, field or line and the problem; callers print it as it is, with no stack
/// trace. Any other exception escaping LoraKit is a defect: the fuzz suite counts it as not handled cleanly.
/// </summary>
public class LoraKitException(string message, Exception? inner = null) : Exception(message, inner);
