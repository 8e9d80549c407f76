#!/usr/bin/env python3
"""torch doing the same layout copies as comm-nccl's device permute, timed
the same way (CUDA events over many iterations), for gpu_bench's side-by-side
table.

Each argument is `key:dtype:view:perm:iters`, e.g.
`case0:bf16:2,512,8,4,128:2,0,1,3,4:100`; for each one this prints
`RESULT key us_per_op`. The timed op is `x.permute(perm).contiguous()` on a
tensor of shape `view`.
"""
import sys

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "f32": torch.float32,
    "f64": torch.float64,
    "i8": torch.int8,
    "u8": torch.uint8,
    "i32": torch.int32,
    "i64": torch.int64,
}


def main() -> int:
    if not torch.cuda.is_available():
        print("torch: CUDA is not available", file=sys.stderr)
        return 1
    dev = torch.device("cuda:0")
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name(dev)}", flush=True)
    for arg in sys.argv[1:]:
        key, dtype, view, perm, iters = arg.split(":")
        view = [int(v) for v in view.split(",")]
        perm = [int(p) for p in perm.split(",")]
        iters = int(iters)
        x = torch.empty(view, dtype=DTYPES[dtype], device=dev)
        x.view(torch.uint8).random_(0, 256)
        for _ in range(3):
            y = x.permute(perm).contiguous()
        torch.cuda.synchronize(dev)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            y = x.permute(perm).contiguous()
        end.record()
        end.synchronize()
        del y
        print(f"RESULT {key} {start.elapsed_time(end) * 1000.0 / iters:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
