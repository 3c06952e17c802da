"""PCIe copy bandwidth between device and page-locked host memory on a side stream, alone and while the compute stream
runs bf16 GEMMs (what checkpoint offload competes with). Prints GB/s per direction, timed with events on the copy stream."""
import torch

MiB = 1 << 20


def main():
    n = 256 * MiB
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    copies = {"device->host": lambda: host.copy_(dev, non_blocking=True), "host->device": lambda: dev.copy_(host, non_blocking=True)}
    for load in (False, True):
        for name, copy in copies.items():
            rates = []
            for _ in range(3):
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(side):
                    start.record()
                    for _ in range(4):
                        copy()
                    end.record()
                if load:
                    for _ in range(60):
                        a @ a
                torch.cuda.synchronize()
                rates.append(4 * n / 1e6 / start.elapsed_time(end))
            print(f"{name:13} {'under GEMM load' if load else 'alone':16} {max(rates):6.1f} GB/s")


if __name__ == "__main__":
    main()
