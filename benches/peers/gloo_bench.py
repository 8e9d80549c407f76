#!/usr/bin/env python3
"""torch.distributed gloo (CPU) baseline for comm-perf's TCP numbers.

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    # or plain `pip install torch` (the PyPI wheel also runs on CPU only)
    python3 benches/peers/gloo_bench.py --nproc 2 --op all_reduce -b 8 -e 64M -f 2
    python3 benches/peers/gloo_bench.py --nproc 4 --op all_to_all --json gloo_w4.json

Run by hand, not in CI. Spawns --nproc processes (torch.multiprocessing) that
rendezvous over a loopback TCPStore, and for every size prints the columns
of nccl-tests and comm-perf: bytes, count, dtype, op, time_us, algbw, busbw
(GB/s; all_reduce busbw = algbw * 2(n-1)/n, all_to_all busbw = algbw * (n-1)/n,
all_gather/reduce_scatter (n-1)/n, broadcast 1). time_us is the mean per
iteration of the slowest rank. --json writes the rows as records with the
fields backend, op, world, dtype, bytes, time_us, algbw_gbps, busbw_gbps, wrong.
Set GLOO_SOCKET_IFNAME=lo to pin the interface (default here: lo).
"""

import argparse
import json
import os
import socket
import sys
import time


def parse_size(s):
    s = s.strip().upper()
    mult = 1
    for suf, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if s.endswith(suf):
            s, mult = s[:-1], m
    return int(float(s) * mult)


def bus_factor(op, n):
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_to_all", "all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, args, port, q):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.nproc,
    )
    n = args.nproc
    rows = []
    size = args.minbytes
    while size <= args.maxbytes:
        count = max(size // 4, 1)
        if args.op == "all_to_all":
            count = max(count // n, 1) * n
        nbytes = count * 4
        x = torch.full((count,), float(rank + 1), dtype=torch.float32)
        y = torch.empty_like(x)
        iters = args.iters or int(min(max((200 << 20) // nbytes, 5), 1000))
        warm = args.warmup if args.warmup is not None else max(iters // 5, 1)

        def once():
            if args.op == "all_reduce":
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
            elif args.op == "all_to_all":
                dist.all_to_all_single(y, x)
            else:
                raise SystemExit(f"unsupported op {args.op}")

        for _ in range(warm):
            once()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
        el = time.perf_counter() - t0
        t = torch.tensor([el], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        us = t.item() * 1e6 / iters
        wrong = 0
        if args.check:
            if args.op == "all_reduce":
                x.fill_(float(rank + 1))
                once()
                wrong = int((x != float(n * (n + 1) // 2)).sum().item())
            else:
                x.fill_(float(rank + 1))
                once()
                exp = torch.arange(1, n + 1, dtype=torch.float32).repeat_interleave(count // n)
                wrong = int((y != exp).sum().item())
        algbw = nbytes / us / 1e3
        rows.append(
            dict(
                backend="gloo",
                op=args.op,
                world=n,
                dtype="f32",
                bytes=nbytes,
                count=count,
                time_us=us,
                algbw_gbps=algbw,
                busbw_gbps=algbw * bus_factor(args.op, n),
                wrong=wrong,
            )
        )
        size *= args.factor
    dist.destroy_process_group()
    if rank == 0:
        q.put(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--op", default="all_reduce", choices=["all_reduce", "all_to_all"])
    p.add_argument("-b", "--minbytes", type=parse_size, default=8)
    p.add_argument("-e", "--maxbytes", type=parse_size, default=64 << 20)
    p.add_argument("-f", "--factor", type=int, default=2)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--check", action="store_true")
    p.add_argument("--json", default=None, help="write the rows as JSON records to this file")
    args = p.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, args, port, q)) for r in range(args.nproc)]
    for pr in procs:
        pr.start()
    rows = q.get()
    for pr in procs:
        pr.join()
    print(f"# gloo {args.op} world {args.nproc} dtype f32")
    print(f"{'bytes':>12} {'count':>12} {'type':>6} {'redop':>6} {'time_us':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>6}")
    for r in rows:
        redop = "sum" if args.op == "all_reduce" else "none"
        print(
            f"{r['bytes']:>12} {r['count']:>12} {'f32':>6} {redop:>6} {r['time_us']:>10.1f} "
            f"{r['algbw_gbps']:>8.3f} {r['busbw_gbps']:>8.3f} {r['wrong'] if args.check else 'N/A':>6}"
        )
    avg = sum(r["busbw_gbps"] for r in rows) / max(len(rows), 1)
    print(f"# Avg bus bandwidth    : {avg:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
