using System.CommandLine;
using System.Text.Json;
using static TorchSharp.torch;

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
            // Past the context the positions are ones the model never saw (a silently meaningless loss), and attention
            // grows with the square of the length: refuse, as generate does; no token spans 1,024 characters.
            int limit = model.Config.MaxPositionEmbeddings;
            if ((long)r.GetValue(text)!.Length > 1024L * limit)
                throw new ArgumentException($"the text has {r.GetValue(text)!.Length} characters, far past the model's context of {limit} tokens");
            var ids = tokenizer.Encode(r.GetValue(text)!);
            if (ids.Length == 0) throw new ArgumentException("the text encodes to no tokens");
            if (ids.Length > limit)
                throw new ArgumentException($"the text has {ids.Length} tokens, but the model's context (max_position_embeddings) is {limit} tokens; shorten it");
            float[] last;
            double? loss = null;
            using (var _ = no_grad())
            using (var scope = NewDisposeScope())
            {
                var input = tensor(ids.Select(x => (long)x).ToArray(), device: model.Device).unsqueeze(0);
                var logits = model.Logits(input, null, null).to(ScalarType.Float32);
                last = logits[0, -1].cpu().data<float>().ToArray();
                if (ids.Length > 1) loss = LoraKit.Models.CausalLM.NextTokenLoss(logits[0], input[0]).item<float>();
            }
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
