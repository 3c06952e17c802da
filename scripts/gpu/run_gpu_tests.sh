#!/usr/bin/env bash
# The GPU tests ([CudaFact]/[CudaTheory] in tests/LoraKit.Tests/Gpu; they skip on machines without CUDA) on the GPU
# machine, which has PyTorch with a CUDA libtorch but no .NET SDK:
#   scripts/gpu/run_gpu_tests.sh pack          (here) publishes tests/LoraKit.GpuTests self-contained, without the
#                                              bundled CPU libtorch, into .gpu-tests/app.txz (git-ignored: carry it)
#   bash scripts/gpu/run_gpu_tests.sh run [NAME...]
#                                              (on the GPU machine, from the repository root) unpacks it and runs the
#                                              tests whose names contain a NAME (all without), against PyTorch's libtorch;
#                                              one ok/FAIL/skip line per test, exit code 1 when one failed or none ran
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=.gpu-tests
case "${1:-}" in
  pack)
    rm -rf "$out" && mkdir -p "$out/app"
    dotnet publish tests/LoraKit.GpuTests/LoraKit.GpuTests.csproj -c Release -r linux-x64 --self-contained true -o "$out/app" -p:DebugType=none >/dev/null
    # keep LibTorchSharp (the managed binding's native half); drop the CPU build of libtorch itself (as ../shared/gpu/pack.sh)
    find "$out/app" \( -name 'libtorch*.so*' -o -name 'libc10*.so*' -o -name 'libgomp*.so*' -o -name 'libshm*.so*' \
      -o -name 'libbackend_with_compiler.so' -o -name 'libaoti_custom_ops.so' -o -name 'libjitbackend_test.so' \
      -o -name 'libnnapi_backend.so' -o -name 'libtorchbind_test.so' \) -delete
    rm -rf "$out/app/cpu"
    XZ_OPT=-T0 tar cJf "$out/app.txz" -C "$out" app && rm -rf "$out/app"
    echo "packed $out/app.txz ($(du -m "$out/app.txz" | cut -f1) MiB); on the GPU machine: bash scripts/gpu/run_gpu_tests.sh run"
    ;;
  run)
    shift
    [ -f "$out/app.txz" ] || { echo "no $out/app.txz: run 'scripts/gpu/run_gpu_tests.sh pack' first and carry $out" >&2; exit 2; }
    dir=/tmp/lorakit-gpu-tests
    rm -rf "$dir" && mkdir -p "$dir" && tar xJf "$out/app.txz" -C "$dir"
    torchlib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    export LD_LIBRARY_PATH="$torchlib:${LD_LIBRARY_PATH:-}"
    export LIBTORCH_DIR="$torchlib"
    exec "$dir/app/LoraKit.GpuTests" "$@"
    ;;
  *)
    echo "usage: scripts/gpu/run_gpu_tests.sh pack | run [NAME...]" >&2
    exit 2
    ;;
esac
