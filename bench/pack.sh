#!/usr/bin/env bash
# Packs the CLI for the GPU machine (self-contained, without the CPU libtorch) into .gpu/ — see ../shared/gpu/pack.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && touch .git/info/exclude
exec ../shared/gpu/pack.sh src/LoraKit.Cli/LoraKit.Cli.csproj
