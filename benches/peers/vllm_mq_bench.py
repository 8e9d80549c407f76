#!/usr/bin/env python3
"""vLLM MessageQueue (shm_broadcast) 1 KiB one-way latency with N readers.

Same definition as `shm_perf --mq-readers N` / comm-perf: the writer enqueues a
1 KiB object to N readers; each reader answers with a small object on its own
return queue (writer = that reader, one reader = rank 0); one-way latency is
half the round trip. Readers are separate processes.

    pip install vllm   # runs without a GPU
    python3 vllm_mq_bench.py --readers 1 2 3 --iters 5000
"""
import argparse
import multiprocessing as mp
import time


def reader(idx, n, handle, back_q, iters):
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    q = MessageQueue.create_from_handle(handle, idx)
    back = MessageQueue(1, 1, max_chunk_bytes=1 << 16, max_chunks=4)
    back_q.put(back.export_handle())
    q.wait_until_ready()
    back.wait_until_ready()
    for _ in range(iters):
        m = q.dequeue()
        back.enqueue(m[:8])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--iters", type=int, default=5000)
    a = ap.parse_args()
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    ctx = mp.get_context("spawn")
    for n in a.readers:
        q = MessageQueue(n, n, max_chunk_bytes=1 << 20, max_chunks=10)
        h = q.export_handle()
        back_q = ctx.Queue()
        ps = [ctx.Process(target=reader, args=(i, n, h, back_q, a.iters)) for i in range(n)]
        for p in ps:
            p.start()
        backs = [MessageQueue.create_from_handle(back_q.get(), 0) for _ in range(n)]
        q.wait_until_ready()
        for b in backs:
            b.wait_until_ready()
        msg = b"x" * 1024
        warm = min(500, a.iters // 10)
        t0 = time.perf_counter()
        for i in range(a.iters):
            if i == warm:
                t0 = time.perf_counter()
            q.enqueue(msg)
            for b in backs:
                b.dequeue()
        rtt = (time.perf_counter() - t0) / (a.iters - warm)
        print(f"vllm mq 1KiB readers={n} one_way_us={rtt * 1e6 / 2:.2f} (rtt {rtt * 1e6:.2f} us)", flush=True)
        for p in ps:
            p.join()


if __name__ == "__main__":
    main()
