#!/usr/bin/env python3
"""vLLM's shared-memory MessageQueue (shm_broadcast) measured like
`comm-shm/examples/shm_perf.rs --mq`: one writer and N reader *processes*,
sizes 4 B .. 64 MiB (x4), two modes per size:

* pipelined: the writer enqueues `bytes` objects back to back; the time per
  message runs until every reader has dequeued the last one (each answers
  once on its own return queue);
* round_trip: the writer enqueues one message, each reader answers with its
  first 8 bytes on its own return queue (a MessageQueue with that reader as
  writer); one-way = half the round trip.

vLLM's defaults are kept (24 MiB chunks, 10 chunks; larger messages overflow
to its ZeroMQ socket, as in production). Output lines match shm_perf:
`pipelined <bytes> <us>` and `round_trip <bytes> <us> (one-way <us>)`.

    pip install vllm   # runs without a GPU
    python3 vllm_mq_bench.py --readers 1 3 [--min 4] [--max 67108864]
"""
import argparse
import multiprocessing as mp
import time


def iters(s):
    return max(20, min(20000, 200_000_000 // max(s, 1024)))


def sizes(lo, hi):
    s, out = lo, []
    while s <= hi:
        out.append(s)
        s *= 4
    return out


def reader(idx, handle, back_q, lo, hi):
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    q = MessageQueue.create_from_handle(handle, idx)
    back = MessageQueue(1, 1, max_chunk_bytes=1 << 16, max_chunks=4)
    back_q.put(back.export_handle())
    q.wait_until_ready()
    back.wait_until_ready()
    for s in sizes(lo, hi):
        it = iters(s)
        warm = it // 10 + 1
        for _ in range(warm + it):
            m = q.dequeue()
        assert len(m) == s
        back.enqueue(m[:8])
        for _ in range(warm + max(it // 4, 10)):
            m = q.dequeue()
            back.enqueue(m[:8])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--min", type=int, default=4)
    ap.add_argument("--max", type=int, default=64 << 20)
    a = ap.parse_args()
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    ctx = mp.get_context("spawn")
    for n in a.readers:
        q = MessageQueue(n, n)
        h = q.export_handle()
        back_q = ctx.Queue()
        ps = [ctx.Process(target=reader, args=(i, h, back_q, a.min, a.max)) for i in range(n)]
        for p in ps:
            p.start()
        backs = [MessageQueue.create_from_handle(back_q.get(), 0) for _ in range(n)]
        q.wait_until_ready()
        for b in backs:
            b.wait_until_ready()
        print(f"# vllm {__import__('vllm').__version__} MessageQueue, 1 writer + {n} reader processes\n"
              "# mode bytes time_us", flush=True)
        big = b"x" * a.max
        for s in sizes(a.min, a.max):
            msg = big[:s]
            it = iters(s)
            warm = it // 10 + 1
            t0 = time.perf_counter()
            for i in range(warm + it):
                if i == warm:
                    t0 = time.perf_counter()
                q.enqueue(msg)
            for b in backs:
                b.dequeue()
            pipe = (time.perf_counter() - t0) / it
            rt_it = max(it // 4, 10)
            t0 = time.perf_counter()
            for i in range(warm + rt_it):
                if i == warm:
                    t0 = time.perf_counter()
                q.enqueue(msg)
                for b in backs:
                    b.dequeue()
            rtt = (time.perf_counter() - t0) / rt_it
            print(f"pipelined {s} {pipe * 1e6:.3f}", flush=True)
            print(f"round_trip {s} {rtt * 1e6:.3f} (one-way {rtt * 5e5:.3f})", flush=True)
        for p in ps:
            p.join()


if __name__ == "__main__":
    main()
