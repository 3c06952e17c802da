using System.Diagnostics;
using System.Text.Json;
using static TorchSharp.torch;

namespace LoraKit.Tests;

/// <summary>The CLI as scripts use it: a real process, JSON on stdout, clear errors on stderr.</summary>
public class CliTests
{
    public static (int code, string stdout, string stderr) RunCli(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "LoraKit.Cli.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(120_000)) { p.Kill(true); throw new TimeoutException("CLI did not finish"); }
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    public static TheoryData<string> Archs => new(Fixtures.Architectures.Concat(FamilyFixtures.Built));

    [Theory]
    [MemberData(nameof(Archs))]
    public void ScoreJsonMatchesTransformers(string arch)
    {
        var reference = Fixtures.Json("reference", arch + ".json").GetProperty("texts")[1];
        var (code, stdout, stderr) = RunCli("score", "--model", Fixtures.Model(arch), "--text", reference.GetProperty("text").GetString()!, "--json", "--device", "cpu");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        var ids = Fixtures.Ids(doc.RootElement.GetProperty("input_ids"));
        Assert.Equal(Fixtures.Ids(reference.GetProperty("input_ids")), ids);
        var last = tensor(doc.RootElement.GetProperty("last_logits").EnumerateArray().Select(x => x.GetSingle()).ToArray());
        var expected = Fixtures.ReferenceTensor(arch, "logits_1")[-1];
        Assert.True(Close.RelError(last, expected) <= 1e-4);
        double loss = doc.RootElement.GetProperty("loss").GetDouble(), refLoss = reference.GetProperty("loss").GetDouble();
        Assert.True(Math.Abs(loss - refLoss) <= 1e-4 * refLoss, $"loss {loss} vs {refLoss}");
    }

    [Fact]
    public void GenerateJsonMatchesTransformers()
    {
        var g = Fixtures.Json("reference", "qwen3.json").GetProperty("generations")[1];
        var (code, stdout, stderr) = RunCli("generate", "--model", Fixtures.Model("qwen3"), "--prompt", g.GetProperty("prompt").GetString()!,
            "--max-new-tokens", "20", "--temperature", "0", "--json");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        Assert.Equal(Fixtures.Ids(g.GetProperty("prompt_ids")), Fixtures.Ids(doc.RootElement.GetProperty("prompt_ids")));
        Assert.Equal(Fixtures.Ids(g.GetProperty("output_ids")), Fixtures.Ids(doc.RootElement.GetProperty("output_ids")));
        Assert.Equal(g.GetProperty("text").GetString(), doc.RootElement.GetProperty("text").GetString());
    }

    /// <summary>
    /// Phi-3 through the CLI: generate, then train a few steps with the default targets, which on Phi-3 are its fused
    /// projections (as PEFT's Phi-3 adapters), and generate with the trained adapter.
    /// </summary>
    [Fact]
    public void Phi3GeneratesAndTrainsWithItsFusedProjections()
    {
        var model = Fixtures.Model("phi3");
        var (code, stdout, stderr) = RunCli("generate", "--model", model, "--prompt", "Hello world", "--max-new-tokens", "5", "--temperature", "0", "--json");
        Assert.True(code == 0, stderr);
        using (var doc = JsonDocument.Parse(stdout)) Assert.Equal(5, doc.RootElement.GetProperty("output_ids").GetArrayLength());
        var output = Path.Combine(Fixtures.TempDir(), "phi3-run");
        (code, _, stderr) = RunCli("train", "--model", model, "--data", Fixtures.Path_("training", "data.jsonl"), "--output", output,
            "--steps", "2", "--batch-size", "2", "--seed", "0");
        Assert.True(code == 0, stderr);
        using (var cfg = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "adapter", "adapter_config.json"))))
            Assert.Equal(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                cfg.RootElement.GetProperty("target_modules").EnumerateArray().Select(t => t.GetString()!));
        (code, stdout, stderr) = RunCli("generate", "--model", model, "--adapter", Path.Combine(output, "adapter"), "--prompt", "Hello world",
            "--max-new-tokens", "5", "--temperature", "0", "--json");
        Assert.True(code == 0, stderr);
    }

    [Fact]
    public void BadInputsGiveOneClearErrorLine()
    {
        var (code, stdout, stderr) = RunCli("score", "--model", "/nonexistent/model", "--text", "hi", "--json");
        Assert.Equal(1, code);
        Assert.Equal("", stdout);
        Assert.Contains("error: model directory '/nonexistent/model' does not exist", stderr);

        var dir = Fixtures.CopyOf(Fixtures.Model("llama"));
        File.WriteAllText(Path.Combine(dir, "config.json"), File.ReadAllText(Path.Combine(dir, "config.json")).Replace("LlamaForCausalLM", "FalconForCausalLM"));
        (code, _, stderr) = RunCli("generate", "--model", dir, "--prompt", "hi", "--json");
        Assert.Equal(1, code);
        Assert.Contains("unsupported architecture 'FalconForCausalLM'", stderr);
        Assert.DoesNotContain("   at ", stderr); // no stack trace for users

        (code, _, stderr) = RunCli("generate", "--model", Fixtures.Model("llama"), "--prompt", "hi", "--top-p", "0");
        Assert.Equal(1, code);
        Assert.Contains("top-p", stderr);
    }

    /// <summary>
    /// The library names a training setting by its key (`cuda_graph`), the CLI by the flag the user typed: the train
    /// command's errors keep saying --cuda-graph, and a switch on by default is named by its --no- flag.
    /// </summary>
    [Fact]
    public void TrainErrorsNameTheFlagsTheLibraryNamesAsSettings()
    {
        var (code, stdout, stderr) = RunCli("train", "--model", Fixtures.Model("llama"), "--data", "d.jsonl", "--cuda-graph", "yes");
        Assert.Equal(1, code);
        Assert.Equal("", stdout);
        Assert.Equal("error: --cuda-graph must be auto, on or off, not 'yes'", stderr.Trim());
        Assert.Contains("`cuda_graph`", Assert.Throws<ArgumentException>(new LoraKit.Training.TrainConfig { Model = "m", Data = "d", CudaGraph = "yes" }.Validate).Message);

        Assert.Equal("--no-eos and --lora-dropout, `not_a_setting`", LoraKit.Cli.Commands.FlagNames.Rephrase("`eos` and `lora_dropout`, `not_a_setting`"));
        Assert.Equal("resume it (--resume) or replace what it wrote (--overwrite)", LoraKit.Cli.Commands.FlagNames.Rephrase("resume it (`resume`) or replace what it wrote (`overwrite`)"));
    }
}

/// <summary>The adapter-related CLI: --adapter, adapter info, merge, combine.</summary>
public class AdapterCliTests
{
    [Fact]
    public void ScoreWithAdapterMatchesPeft()
    {
        var text = Fixtures.Json("reference", "peft_qwen3.json").GetProperty("texts")[1];
        var (code, stdout, stderr) = CliTests.RunCli("score", "--model", Fixtures.Model("qwen3"), "--adapter", Fixtures.Path_("adapters", "qwen3", "regex"),
            "--text", text.GetProperty("text").GetString()!, "--json", "--device", "cpu");
        Assert.True(code == 0, stderr);
        using var doc = System.Text.Json.JsonDocument.Parse(stdout);
        var last = tensor(doc.RootElement.GetProperty("last_logits").EnumerateArray().Select(x => x.GetSingle()).ToArray());
        Assert.True(Close.RelError(last, Fixtures.ReferenceTensor("peft_qwen3", "regex_1")[-1]) <= 1e-4);
    }

    [Fact]
    public void AdapterInfoReportsRankTargetsParamsAndSize()
    {
        var (code, stdout, stderr) = CliTests.RunCli("adapter", "info", Fixtures.Path_("adapters", "mistral", "a"), "--json");
        Assert.True(code == 0, stderr);
        using var doc = System.Text.Json.JsonDocument.Parse(stdout);
        var r = doc.RootElement;
        Assert.Equal(8, r.GetProperty("r").GetInt32());
        Assert.Equal("k_proj, o_proj, q_proj, v_proj", r.GetProperty("target_modules").GetString());
        Assert.Equal(Fixtures.Json("reference", "peft_mistral.json").GetProperty("adapters").GetProperty("a").GetProperty("trainable_params").GetInt64(),
            r.GetProperty("trainable_params").GetInt64());
        Assert.Equal(new FileInfo(Fixtures.Path_("adapters", "mistral", "a", "adapter_model.safetensors")).Length, r.GetProperty("file_bytes").GetInt64());
        (code, stdout, _) = CliTests.RunCli("adapter", "info", Fixtures.Path_("adapters", "mistral", "a"));
        Assert.Contains("rank (r):         8", stdout);
    }

    [Fact]
    public void MergeWritesACheckpointScoringLikeTheAdapter()
    {
        var outDir = Path.Combine(Fixtures.TempDir(), "merged");
        var (code, _, stderr) = CliTests.RunCli("merge", "--no-gate", "--model", Fixtures.Model("mistral"), "--adapter", Fixtures.Path_("adapters", "mistral", "a"), "--output", outDir);
        Assert.True(code == 0, stderr);
        var text = Fixtures.Json("reference", "peft_mistral.json").GetProperty("texts")[0].GetProperty("text").GetString()!;
        var merged = CliTests.RunCli("score", "--model", outDir, "--text", text, "--json");
        Assert.True(merged.code == 0, merged.stderr);
        using var doc = System.Text.Json.JsonDocument.Parse(merged.stdout);
        var last = tensor(doc.RootElement.GetProperty("last_logits").EnumerateArray().Select(x => x.GetSingle()).ToArray());
        Assert.True(Close.RelError(last, Fixtures.ReferenceTensor("peft_mistral", "merged_a_0")[-1]) <= 1e-4);
        // Refuses to overwrite.
        (code, _, stderr) = CliTests.RunCli("merge", "--no-gate", "--model", Fixtures.Model("mistral"), "--adapter", Fixtures.Path_("adapters", "mistral", "a"), "--output", outDir);
        Assert.Equal(1, code);
        Assert.Contains("not empty", stderr);
    }

    [Fact]
    public void CombineCatWritesPeftsCombination()
    {
        var outDir = Path.Combine(Fixtures.TempDir(), "combo");
        var a = Fixtures.Path_("adapters", "llama", "a");
        var b = Fixtures.Path_("adapters", "llama", "b");
        var (code, _, stderr) = CliTests.RunCli("combine", "--model", Fixtures.Model("llama"), "--adapters", $"{a}:0.7,{b}:0.3", "--method", "cat", "--output", outDir);
        Assert.True(code == 0, stderr);
        using var mine = LoraKit.IO.SafetensorsFile.Open(Path.Combine(outDir, "adapter_model.safetensors"));
        using var peft = LoraKit.IO.SafetensorsFile.Open(Fixtures.Path_("adapters", "llama", "a_b_cat", "adapter_model.safetensors"));
        Assert.Equal(peft.Entries.Keys.Order(), mine.Entries.Keys.Order());
        foreach (var k in peft.Entries.Keys) Assert.True(Close.RelError(mine.Read(k), peft.Read(k)) <= 1e-6, k);
    }
}
