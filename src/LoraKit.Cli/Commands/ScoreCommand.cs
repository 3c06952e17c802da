using System.CommandLine;
using LoraKit.Generation;

namespace LoraKit.Cli.Commands;

/// <summary><c>lorakit score</c>: token ids, last-position logits and mean next-token loss of a text.</summary>
public static class ScoreCommand
{
    public static Command Build()
    {
        var common = new CommonOptions();
        var text = new Option<string>("--text") { Description = "text to score", Required = true };
        var cmd = new Command("score", "Score a text: its token ids, fp32 logits at the last position and mean next-token loss.");
        common.AddTo(cmd);
        cmd.Options.Add(text);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var (model, tokenizer) = common.Load(r);
            var (ids, last, loss) = TextScore.Of(model, tokenizer, r.GetValue(text)!);
            if (r.GetValue(common.Json))
            {
                Console.WriteLine(CliJson.Serialize(new { input_ids = ids, last_logits = last, loss }));
                return 0;
            }
            int top = Array.IndexOf(last, last.Max());
            Console.WriteLine($"tokens: {ids.Length}");
            Console.WriteLine($"loss: {(loss is double l ? $"{l:F4} (perplexity {Math.Exp(l):F2})" : "n/a (one token)")}");
            Console.WriteLine($"most likely next token: {top} {CliJson.Serialize(tokenizer.Decode([top]))} (logit {last[top]:F3})");
            return 0;
        }));
        return cmd;
    }
}
