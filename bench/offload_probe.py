"""What moving saved activations to pinned host memory would cost on this GPU (PyTorch).

Recomputing a layer to save memory costs launches (a MiniLM step is bound by them) or FLOPs (a
7B layer at 8,192 tokens); the copy engines sit idle meanwhile. This measures (1) pinned
device-to-host and host-to-device bandwidth on a side stream; (2) how much a launch-bound stream
of small kernels slows down while the side stream copies: a MiniLM-sized step (about 1,000
kernels on [2048, 384] f32 tensors) alone, and with --mb MB copied out and back during it; (3) the
host's cost of issuing a copy in pieces (one call per saved tensor); (4) a compute-bound stream
(bf16 products of a LLaMA-7B layer's widths at 8,192 tokens) alone and while a 7B layer's saved
state at that length (about 700 MB) is copied out. Medians of --repeats.

    python3 bench/offload_probe.py [--mb 100] [--repeats 20]
"""

import argparse
import statistics
import time

import torch


def bandwidth(n_bytes, direction, stream):
    dev = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            if direction == "d2h":
                host.copy_(dev, non_blocking=True)
            else:
                dev.copy_(host, non_blocking=True)
        stream.synchronize()
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times) / 1e9


def launch_bound_step(x, w, kernels):
    """About `kernels` small kernels: a product and three elementwise ops per round."""
    y = x
    for _ in range(kernels // 4):
        y = torch.relu(y @ w) * 0.5 + x
    return y


def step_ms(x, w, kernels, copy, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        if copy is not None:
            copy()
        launch_bound_step(x, w, kernels)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100, help="MB copied out and back during a step")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kernels", type=int, default=1000)
    args = ap.parse_args()
    side = torch.cuda.Stream()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for mb in (3, 32, 100):
        n = mb * 1_000_000
        print(
            f"{mb} MB pinned: device->host {bandwidth(n, 'd2h', side):.1f} GB/s, "
            f"host->device {bandwidth(n, 'h2d', side):.1f} GB/s"
        )
    x = torch.randn(2048, 384, device="cuda")
    w = torch.randn(384, 384, device="cuda") / 20
    n = args.mb * 1_000_000
    dev_out = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev_in = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def copy_both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(dev_out, non_blocking=True)
            dev_in.copy_(host, non_blocking=True)

    for _ in range(3):
        step_ms(x, w, args.kernels, None, 2)
    alone = step_ms(x, w, args.kernels, None, args.repeats)
    with_copy = step_ms(x, w, args.kernels, copy_both, args.repeats)
    t = time.perf_counter()
    copy_both()
    side.synchronize()
    copy_only = (time.perf_counter() - t) * 1e3
    print(
        f"launch-bound step of {args.kernels} kernels: {alone:.2f} ms alone, {with_copy:.2f} ms "
        f"with {args.mb} MB copied out and back on a side stream ({copy_only:.2f} ms by itself)"
    )

    # (3) The host's cost of issuing copies in pieces of 3 MB (a MiniLM layer's tensors).
    pieces = [dev_out[i : i + 3_000_000] for i in range(0, n - 3_000_000 + 1, 3_000_000)]
    hosts = [host[i : i + 3_000_000] for i in range(0, n - 3_000_000 + 1, 3_000_000)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.cuda.stream(side):
        for d, h in zip(pieces, hosts):
            h.copy_(d, non_blocking=True)
    issued = (time.perf_counter() - t) * 1e6 / len(pieces)
    side.synchronize()
    print(f"issuing a 3 MB device->host copy: {issued:.1f} us of host time each ({len(pieces)} copies)")

    # (4) Compute-bound: a 7B layer's gate/up/down products at 8,192 tokens, bf16.
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    wg = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16)
    wd = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
    state = torch.empty(700_000_000, dtype=torch.uint8, device="cuda")
    state_host = torch.empty(700_000_000, dtype=torch.uint8, pin_memory=True)

    def compute():
        for _ in range(4):
            (a @ wg) @ wd

    def timed(copy):
        times = []
        for _ in range(max(5, args.repeats // 4)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            if copy:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    state_host.copy_(state, non_blocking=True)
            compute()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    timed(False)
    busy, busy_copy = timed(False), timed(True)
    t = time.perf_counter()
    with torch.cuda.stream(side):
        state_host.copy_(state, non_blocking=True)
    side.synchronize()
    print(
        f"compute-bound products (7B widths, 8,192 tokens): {busy:.2f} ms alone, {busy_copy:.2f} ms "
        f"while 700 MB go to the host ({(time.perf_counter() - t) * 1e3:.2f} ms by itself)"
    )


if __name__ == "__main__":
    main()
