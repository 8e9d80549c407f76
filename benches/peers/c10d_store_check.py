#!/usr/bin/env python3
"""Our c10d store against PyTorch's, both ways. Run by hand; needs torch.

1. A real ``torch.distributed.TCPStore`` server (libuv and, where this torch
   still has it, the classic backend) with our client, the example
   ``c10d_probe client`` of dist-utils.
2. Our server (``c10d_probe serve``) with a real torch ``TCPStore`` client.
3. ``torchrun`` (``--standalone`` and the default static rendezvous, 2 and 4
   processes) starting ``c10d_probe rendezvous``: every rank must find the
   agent's store (``TORCHELASTIC_USE_AGENT_STORE=True``) and gather all ranks.

Every check prints ``PASS <what>`` or ``FAIL <what>``; the exit status is 1
if any failed.

    python3 benches/peers/c10d_store_check.py            # builds the probe
    python3 benches/peers/c10d_store_check.py --probe PATH
"""

import argparse
import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FAILED = []


def check(what, fn):
    try:
        ok = fn()
        err = ""
    except Exception as e:  # a failed check, not a crash of the script
        ok, err = False, f": {type(e).__name__}: {e}"
    print(f"{'PASS' if ok else 'FAIL'} {what}{err}", flush=True)
    if not ok:
        FAILED.append(what)


def build_probe():
    subprocess.run(
        ["cargo", "build", "-q", "-p", "dist-utils", "--example", "c10d_probe"],
        cwd=ROOT,
        check=True,
    )
    return os.path.join(ROOT, "target", "debug", "examples", "c10d_probe")


def torch_server_our_client(probe, use_libuv):
    label = "libuv" if use_libuv else "classic"
    try:
        server = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=30), use_libuv=use_libuv,
        )
    except Exception as e:  # this torch may lack one of the backends
        print(f"SKIP torch {label} server: {e}")
        return
    print(f"# torch {torch.__version__} TCPStore ({label}) on port {server.port}, our client")
    server.set("py/hello", "from python")
    out = subprocess.run(
        [probe, "client", "127.0.0.1", str(server.port)],
        capture_output=True, text=True, timeout=120,
    )
    for line in out.stdout.splitlines():
        print(f"  [{label}] {line}")
        if line.startswith("FAIL"):
            FAILED.append(f"[{label}] {line}")
    if out.returncode != 0:
        print(out.stderr)
        FAILED.append(f"[{label}] probe exit {out.returncode}")
    check(f"[{label}] Python reads the key our client set",
          lambda: server.get("rs/hello") == b"from rust")
    check(f"[{label}] our counter as Python sees it", lambda: server.add("rs/n", 0) == 3)


def our_server_torch_client(probe):
    proc = subprocess.Popen([probe, "serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        port = int(line[1])
        print(f"# our c10d server on port {port}, torch {torch.__version__} client")
        c = dist.TCPStore("127.0.0.1", port, is_master=False,
                          timeout=datetime.timedelta(seconds=10))
        check("torch client connects (validate, ping)", lambda: True)
        c.set("a", "1")
        check("set/get", lambda: c.get("a") == b"1")
        check("add", lambda: c.add("n", 5) == 5 and c.add("n", -2) == 3)
        check("add stores decimal text", lambda: c.get("n") == b"3")
        check("compare_set absent, expected empty",
              lambda: c.compare_set("cs", "", "one") == b"one")
        check("compare_set wrong expectation",
              lambda: c.compare_set("cs", "x", "two") == b"one")
        check("compare_set swap", lambda: c.compare_set("cs", "one", "two") == b"two")
        check("compare_set absent, expected given (torch returns expected)",
              lambda: c.compare_set("cs-absent", "x", "y") == b"x")
        check("check", lambda: c.check(["a", "n"]) and not c.check(["a", "zz"]))
        c.wait(["a"], datetime.timedelta(seconds=5))
        check("wait present", lambda: True)

        def wait_times_out():
            try:
                c.wait(["never"], datetime.timedelta(milliseconds=300))
            except Exception as e:  # DistStoreError / RuntimeError
                return "timeout" in str(e).lower() or "wait" in str(e).lower()
            return False

        check("wait timeout (cancel_wait)", wait_times_out)
        check("usable after a cancelled wait", lambda: c.get("a") == b"1")
        n = c.num_keys()
        check("delete_key", lambda: c.delete_key("a") and not c.delete_key("a"))
        check("num_keys", lambda: c.num_keys() == n - 1)
        c.append("ap", "x")
        c.append("ap", "y")
        check("append", lambda: c.get("ap") == b"xy")
        c.multi_set(["m1", "m2"], ["v1", "v2"])
        check("multi_set/multi_get", lambda: c.multi_get(["m1", "m2"]) == [b"v1", b"v2"])
        c2 = dist.TCPStore("127.0.0.1", port, is_master=False,
                           timeout=datetime.timedelta(seconds=10))
        check("second client sees the keys", lambda: c2.get("m1") == b"v1")
        prefixed = dist.PrefixStore("/worker/attempt_0", c2)
        prefixed.set("k", "v")
        check("PrefixStore key layout", lambda: c.get("/worker/attempt_0/k") == b"v")
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def torchrun_rendezvous(probe):
    import socket

    for nproc in (2, 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for label, flags in (
            ("--standalone", ["--standalone"]),
            ("default", ["--nnodes", "1", "--master-addr", "127.0.0.1",
                         "--master-port", str(port)]),
        ):
            cmd = [sys.executable, "-m", "torch.distributed.run", *flags,
                   "--nproc-per-node", str(nproc), "--no-python", probe, "rendezvous"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            lines = [l for l in out.stdout.splitlines() if "rendezvous rank" in l]
            for l in lines:
                print(f"  [torchrun {label} x{nproc}] {l}")
            check(f"torchrun {label} --nproc-per-node {nproc}: exit 0, {nproc} ranks PASS",
                  lambda: out.returncode == 0 and len(lines) == nproc
                  and all(l.startswith("PASS") for l in lines))
            if out.returncode != 0:
                print(out.stderr[-3000:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", help="path of a built c10d_probe example")
    args = ap.parse_args()
    probe = args.probe or build_probe()
    torch_server_our_client(probe, use_libuv=True)
    torch_server_our_client(probe, use_libuv=False)
    our_server_torch_client(probe)
    torchrun_rendezvous(probe)
    print(f"# {len(FAILED)} failed" + (f": {FAILED}" if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
