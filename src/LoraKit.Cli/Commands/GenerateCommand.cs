using System.CommandLine;
using System.Text.Json;
using LoraKit.Generation;
using LoraKit.Models;

namespace LoraKit.Cli.Commands;

/// <summary><c>lorakit generate</c>: continue a prompt (greedy or sampled).</summary>
public static class GenerateCommand
{
    public static Command Build()
    {
        var common = new CommonOptions();
        var prompt = new Option<string>("--prompt") { Description = "prompt text (encoded with the tokenizer's special tokens, e.g. BOS)", Required = true };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "tokens to generate at most", DefaultValueFactory = _ => 64 };
        var temperature = new Option<double>("--temperature") { Description = "0 = greedy", DefaultValueFactory = _ => 0.0 };
        var topK = new Option<int>("--top-k") { Description = "keep the k most likely tokens (0 = off)", DefaultValueFactory = _ => 0 };
        var topP = new Option<double>("--top-p") { Description = "nucleus sampling mass (1 = off)", DefaultValueFactory = _ => 1.0 };
        var seed = new Option<long?>("--seed") { Description = "seed for sampling" };
        var stop = new Option<string[]>("--stop") { Description = "stop string (repeatable)", AllowMultipleArgumentsPerToken = false };
        var chat = new Option<bool>("--chat") { Description = "wrap the prompt as one user message through the model's chat template" };
        var cmd = new Command("generate", "Generate a continuation of a prompt.");
        common.AddTo(cmd);
        foreach (var o in new Option[] { prompt, maxNew, temperature, topK, topP, seed, stop, chat }) cmd.Options.Add(o);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var (model, tokenizer) = common.Load(r);
            string text = r.GetValue(prompt)!;
            int[] promptIds;
            if (r.GetValue(chat))
            {
                var template = tokenizer.Config.ChatTemplate ?? throw new InvalidOperationException("the model has no chat template");
                var rendered = new LoraKit.Tokenization.ChatTemplate(template).Render([new("user", text)], true, tokenizer.Config);
                promptIds = tokenizer.Encode(rendered, addSpecialTokens: false); // the template already holds BOS
            }
            else promptIds = tokenizer.Encode(text);
            var options = new SamplingOptions
            {
                MaxNewTokens = r.GetValue(maxNew),
                Temperature = r.GetValue(temperature),
                TopK = r.GetValue(topK),
                TopP = r.GetValue(topP),
                Seed = r.GetValue(seed),
                StopStrings = r.GetValue(stop) ?? [],
                EosTokenIds = StopTokens.EosTokenIds(model.Config, tokenizer, common.ModelDir(r)),
            };
            bool json = r.GetValue(common.Json);
            var result = new TextGenerator(model, tokenizer).Generate(promptIds, options, json ? null : piece => Console.Write(piece));
            if (json)
                Console.WriteLine(CliJson.Serialize(new
                {
                    prompt_ids = result.PromptIds,
                    output_ids = result.OutputIds,
                    text = result.Text,
                    finish_reason = result.FinishReason == FinishReason.Stop ? "stop" : "length",
                }));
            else Console.WriteLine();
            return 0;
        }));
        return cmd;
    }
}
