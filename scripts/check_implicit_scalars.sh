#!/usr/bin/env bash
# Lists every call site in src/ that creates a TorchSharp Scalar (or Tensor) implicitly and leaves it to the finalizer
# (src/LoraKit/ScalarOps.cs says why that is a use-after-free). Reads the Release build of tests/LoraKit.Tests:
# build it first. Output: "file:line<TAB>callee", one per call; nothing when all sites hold their Scalars.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/tests/LoraKit.Tests/bin/Release/net10.0"
dotnet build "$root/scripts/scalar_scan" -c Release --nologo -v:q -clp:NoSummary >/dev/null
torch=$(find ~/.nuget/packages/torchsharp/ -path "*lib/net8.0/TorchSharp.dll" | sort | tail -1)
dotnet "$root/scripts/scalar_scan/bin/Release/net10.0/scalar_scan.dll" "$torch" "$bin/LoraKit.dll" "$bin/LoraKit.Server.dll" "$bin/LoraKit.Cli.dll" \
  | sed "s|$root/||" | sort -t: -k1,1 -k2n | uniq
