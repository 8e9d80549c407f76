#!/usr/bin/env python3
"""Peer of executor/benches/rpc.rs: FastVideo's executor mechanism.

A driver calls a method on N worker processes the way FastVideo's
MultiprocExecutor.collective_rpc does: it sends {"method", "args", "kwargs"}
to every worker over a multiprocessing Pipe (pickled), then receives one
pickled reply per worker, in rank order. Measured here:

  rt      round trip of a call with a SIZE-byte argument whose result is the
          same SIZE bytes from every worker;
  bcast   a BIG-byte argument to every worker, each replying with its length.

Run by the Rust bench (side by side, same machine, same run), or by hand:

  python3 benches/peers/mp_rpc.py --workers 4 --size 1024 --iters 2000 \
      --big 16777216 --big-iters 10

Prints one JSON line: {"rt_us": ..., "bcast_ms": ..., ...} (medians).
"""

import argparse
import json
import multiprocessing as mp
import statistics
import time


def worker(rank, conn):
    while True:
        msg = conn.recv()
        method = msg["method"]
        args = msg["args"]
        if method == "shutdown":
            conn.send({"status": "success", "result": None})
            return
        if method == "echo":
            result = args[0]
        elif method == "size":
            result = len(args[0])
        else:
            conn.send({"status": "error", "result": f"no method {method}"})
            continue
        conn.send({"status": "success", "result": result})


class Driver:
    def __init__(self, n):
        ctx = mp.get_context("fork")
        self.pipes = []
        self.procs = []
        for rank in range(n):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker, args=(rank, child), daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def collective_rpc(self, method, *args):
        for p in self.pipes:
            p.send({"method": method, "args": args, "kwargs": {}})
        out = []
        for p in self.pipes:
            r = p.recv()
            if r["status"] != "success":
                raise RuntimeError(r["result"])
            out.append(r["result"])
        return out

    def close(self):
        self.collective_rpc("shutdown")
        for p in self.procs:
            p.join(10)


def batches(fn, iters, nbatch):
    per = max(1, iters // nbatch)
    times = []
    for _ in range(nbatch):
        t = time.perf_counter()
        for _ in range(per):
            fn()
        times.append((time.perf_counter() - t) / per)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--big", type=int, default=16 << 20)
    ap.add_argument("--big-iters", type=int, default=10)
    a = ap.parse_args()

    d = Driver(a.workers)
    payload = bytes(i % 251 for i in range(a.size))
    for _ in range(200):
        assert d.collective_rpc("echo", payload) == [payload] * a.workers
    rt = batches(lambda: d.collective_rpc("echo", payload), a.iters, 10)

    big = bytes(a.big)
    d.collective_rpc("size", big)
    bcast = batches(lambda: d.collective_rpc("size", big), a.big_iters, a.big_iters)
    d.close()
    print(json.dumps({
        "workers": a.workers,
        "size": a.size,
        "rt_us": rt * 1e6,
        "big": a.big,
        "bcast_ms": bcast * 1e3,
    }))


if __name__ == "__main__":
    main()
