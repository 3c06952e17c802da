// Sample: the LoraKit package from an application's point of view. Loads a model, generates greedily and prints
// the new token ids and the text; a LoraKit error (a bad directory, no TorchSharp backend) is one line and exit 1.
//   dotnet run -- MODEL_DIR [PROMPT]
using LoraKit;

try
{
    string modelDir = args.Length > 0 ? args[0] : "models/my-model";
    string prompt = args.Length > 1 ? args[1] : "hello";
    using var model = LoraKitModel.FromPretrained(modelDir, device: "cpu");
    var result = model.Generate(prompt, new() { MaxNewTokens = 8 });
    Console.WriteLine("ids: " + string.Join(' ', result.OutputIds));
    Console.WriteLine("text: " + result.Text);
    return 0;
}
catch (LoraKitException e)
{
    Console.Error.WriteLine($"error: {e.Message}");
    return 1;
}
