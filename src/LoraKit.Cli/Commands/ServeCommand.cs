using System.CommandLine;
using System.Runtime.InteropServices;
using LoraKit.Registry;
using LoraKit.Server;

namespace LoraKit.Cli.Commands;

/// <summary><c>lorakit serve</c>: the OpenAI-compatible server over one base model and a directory of adapters, a registry, or both.</summary>
public static class ServeCommand
{
    public static Command Build()
    {
        var model = new Option<string>("--model") { Description = "base model directory", Required = true };
        var adapters = new Option<string?>("--adapters") { Description = "directory whose subdirectories are PEFT adapters, addressed by name (needed unless --registry)" };
        var registry = new Option<string?>("--registry")
        {
            Description = $"adapter registry to serve from (default: ${AdapterStore.EnvVar} when set; never ~/.lorakit/registry implicitly): " +
                          "\"model\": \"NAME@VERSION\", \"NAME@ALIAS\", or \"NAME\" = NAME@production; an alias moved by `lorakit registry promote/rollback` " +
                          "applies to the next request, without restart",
        };
        var host = new Option<string>("--host") { Description = "interface to listen on", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "TCP port (0 = any free port)", DefaultValueFactory = _ => 8000 };
        var apiKey = new Option<string?>("--api-key") { Description = "key for /v1 endpoints (or LORAKIT_API_KEY)" };
        var adminKey = new Option<string?>("--admin-key") { Description = "key for /admin endpoints (or LORAKIT_ADMIN_KEY)" };
        var device = new Option<string>("--device") { Description = "auto, cpu or cuda", DefaultValueFactory = _ => "auto" };
        var dtype = new Option<string?>("--dtype") { Description = "fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)" };
        var maxAdapters = new Option<int>("--max-gpu-adapters", "--max-loaded-adapters") { Description = "adapters kept loaded on the device (least recently used evicted)", DefaultValueFactory = _ => 8 };
        var maxCpu = new Option<int>("--max-cpu-adapters") { Description = "adapters kept read and validated in host memory (a request for one evicted from the device then costs a copy, not a read)", DefaultValueFactory = _ => 32 };
        var kvMemory = new Option<double>("--kv-cache-memory") { Description = "KV cache size: a fraction of the device memory free after loading (≤ 1) or GiB (> 1)", DefaultValueFactory = _ => 0.9 };
        var stepTokens = new Option<int>("--max-tokens-per-step") { Description = "tokens one engine step computes (decode tokens plus prefill chunks): bounds how long a long prompt delays others", DefaultValueFactory = _ => 2048 };
        var noGraphs = new Option<bool>("--no-cuda-graphs") { Description = "decode eagerly instead of replaying CUDA graphs" };
        var maxBatch = new Option<int>("--max-batch") { Description = "sequences decoded together", DefaultValueFactory = _ => 16 };
        var maxTokens = new Option<int>("--max-tokens-limit") { Description = "largest max_tokens a request may ask for", DefaultValueFactory = _ => 1024 };
        var maxPrompt = new Option<int>("--max-prompt-tokens") { Description = "longest prompt accepted", DefaultValueFactory = _ => 4096 };
        var maxConcurrent = new Option<int>("--max-concurrent") { Description = "requests generating at once (more queue, then 429)", DefaultValueFactory = _ => 32 };
        var allowMismatch = CommonOptions.NewAllowBaseMismatch();
        var drain = new Option<double>("--drain-seconds") { Description = "on SIGTERM or Ctrl+C, how long in-flight requests may finish", DefaultValueFactory = _ => 30.0 };
        var insecure = new Option<bool>("--insecure") { Description = "allow a non-loopback --host without any key" };
        var quiet = new Option<bool>("--quiet") { Description = "no log line per request" };
        var metricsPublic = new Option<bool>("--metrics-public") { Description = "serve GET /metrics (Prometheus) without a key even when keys are set, for a scraper in a trusted network" };
        var quantize = new QuantizeOptions();
        var cmd = new Command("serve", "Serve one base model and many LoRA adapters over an OpenAI-compatible HTTP API: adapters from a directory " +
                                       "(\"model\": \"NAME\"), from the registry (\"model\": \"NAME@VERSION\", \"NAME@ALIAS\", or \"NAME\" = NAME@production, " +
                                       "a 404 when that alias does not exist; alias moves apply to the next request), or both. " +
                                       "With a key set, every endpoint but /health needs one (/metrics too, unless --metrics-public); the admin key also works on /v1. " +
                                       "On SIGTERM it drains: /health answers 503 and new requests 503 while in-flight ones finish.")
            { model, adapters, registry, host, port, apiKey, adminKey, device, dtype, maxAdapters, maxCpu, kvMemory, stepTokens, noGraphs, maxBatch, maxTokens, maxPrompt, maxConcurrent, drain, insecure, quiet, allowMismatch, metricsPublic };
        quantize.AddTo(cmd);
        cmd.SetAction(r => CommonOptions.Run(() =>
        {
            var options = new ServerOptions
            {
                Model = ModelArgument.Resolve(r.GetValue(model)!), ModelName = ModelArgument.HubName(r.GetValue(model)!), Adapters = r.GetValue(adapters), Registry = RegistryPath(r.GetValue(registry), r.GetValue(adapters)), Host = r.GetValue(host)!, Port = r.GetValue(port),
                ApiKey = r.GetValue(apiKey) ?? Environment.GetEnvironmentVariable("LORAKIT_API_KEY"),
                AdminKey = r.GetValue(adminKey) ?? Environment.GetEnvironmentVariable("LORAKIT_ADMIN_KEY"),
                Device = r.GetValue(device)!, Dtype = r.GetValue(dtype), MaxLoadedAdapters = r.GetValue(maxAdapters), MaxBatch = r.GetValue(maxBatch),
                MaxHostAdapters = r.GetValue(maxCpu), KvCacheMemory = r.GetValue(kvMemory), MaxTokensPerStep = r.GetValue(stepTokens), CudaGraphs = !r.GetValue(noGraphs),
                MaxTokens = r.GetValue(maxTokens), MaxPromptTokens = r.GetValue(maxPrompt), MaxConcurrent = r.GetValue(maxConcurrent),
                AllowBaseMismatch = r.GetValue(allowMismatch), Quantize = quantize.Resolve(r),
                DrainTimeout = TimeSpan.FromSeconds(r.GetValue(drain) is var d && d >= 0 && d <= 3600 ? d : throw new LoraKitException("--drain-seconds must be between 0 and 3600")),
                Insecure = r.GetValue(insecure), MetricsPublic = r.GetValue(metricsPublic),
                Log = r.GetValue(quiet) ? null : Console.Out.WriteLine,
            };
            if (options.ApiKey is null && options.AdminKey is null && (options.IsLoopback || options.Insecure)) // else StartAsync refuses
                Console.Error.WriteLine($"warning: no --api-key or --admin-key: ANYONE who can reach {options.Host}:{options.Port} can generate, " +
                                        "list adapters and load or unload them");
            // SIGTERM (docker, systemd, Kubernetes) and SIGINT (Ctrl+C) both stop gracefully; a second one ends at once.
            using var done = new ManualResetEventSlim();
            int signals = 0;
            void OnSignal(PosixSignalContext ctx)
            {
                if (Interlocked.Increment(ref signals) > 1) return; // not cancelled: the default action ends the process
                ctx.Cancel = true;
                done.Set();
            }
            using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);
            using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
            var server = OpenAiServer.StartAsync(options).GetAwaiter().GetResult();
            string from = string.Join(" and ", new[] { options.Adapters is { } a ? $"adapters from {a}" : null, options.Registry is { } g ? $"the registry at {Path.GetFullPath(g)}" : null }.OfType<string>());
            Console.WriteLine($"lorakit serve: listening on {server.Url} (model {options.Model}, {from}); Ctrl+C or SIGTERM stops");
            done.Wait();
            Console.WriteLine($"lorakit serve: stopping; in-flight requests have {options.DrainTimeout.TotalSeconds:0.#} s to finish");
            server.DisposeAsync().AsTask().GetAwaiter().GetResult();
            Console.WriteLine("lorakit serve: stopped");
            return 0;
        }));
        return cmd;
    }

    /// <summary>
    /// The registry to serve: --registry, else LORAKIT_REGISTRY when set, else none. Unlike the other commands a server
    /// never falls back to ~/.lorakit/registry: it exposes what it serves to clients, so serving a registry is asked for.
    /// A LORAKIT_REGISTRY that holds no registry yet (set for training, say) is passed over with a note when --adapters
    /// gives the server something to serve; given alone, or as --registry, it must exist.
    /// </summary>
    static string? RegistryPath(string? given, string? adapters)
    {
        if (given is not null) return given;
        if (Environment.GetEnvironmentVariable(AdapterStore.EnvVar) is { Length: > 0 } env)
        {
            if (adapters is null || File.Exists(Path.Combine(env, AdapterStore.DbFile))) return env;
            Console.Error.WriteLine($"note: ${AdapterStore.EnvVar}={env} holds no registry yet; serving the adapters directory only");
            return null;
        }
        if (adapters is null) throw new LoraKitException("serve needs --adapters DIR, --registry PATH, or both (or LORAKIT_REGISTRY)");
        return null;
    }
}
