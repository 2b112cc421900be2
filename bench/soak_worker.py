"""One soak loader: a long-lived process that loads checkpoints through the mount on request and checks
every tensor or byte against the source, driven by soak.py over stdin/stdout.

Protocol: the worker prints ``{"ready": pid}``; then, for each job line ``{"ckpt", "kind", "seed", "drop"}`` on
stdin, it prints ``{"beat": 1}`` after each unit of work (one shard of `load_file`, one tensor, one
`pread`), so the parent can tell a slow load from a hung read, and ends with one ``{"done": ...}`` line:
bytes verified, mismatches (what differed, by name or offset) and the error that ended the load, if any.

A read error inside a mapping (safetensors and `torch.load(mmap=True)` map the file) is SIGBUS, which
ends this process: the parent counts that load as failed with an I/O error and starts a new worker.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

KINDS = ("load_file", "safe_open", "torch_mmap", "pread")


def digest(t: torch.Tensor) -> str:
    """xxh3-64 of a tensor's bytes (the same function soak.py used on the source)."""
    t = t.contiguous()
    return xxhash.xxh3_64_hexdigest(t.reshape(-1).view(torch.uint8).numpy())


class Job:
    def __init__(self, mount: Path, source: Path, ref: dict[str, Any], ckpt: str, seed: int) -> None:
        self.mnt = mount / ckpt
        self.src = source / ckpt
        self.ref = ref  # {"shards": [...], "torch": name, "tensors": {file: {name: digest}}}
        self.rnd = random.Random(seed)
        self.bytes = 0
        self.mismatches: list[str] = []

    def drop_page_cache(self) -> None:
        """Drop the kernel's cached pages of this checkpoint's files (pages other loaders map stay), so
        this load is served by the daemon, not by the page cache an earlier load filled."""
        for f in [*self.ref["shards"], self.ref["torch"]]:
            fd = os.open(self.mnt / f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def beat(self) -> None:
        print('{"beat": 1}', flush=True)

    def check(self, file: str, name: str, t: torch.Tensor) -> None:
        want = self.ref["tensors"][file].get(name)
        if want is None or digest(t) != want:
            self.mismatches.append(f"{file}:{name}")
        self.bytes += t.numel() * t.element_size()

    def load_file(self) -> None:
        """HF's `load_state_dict(load_file(shard))`, shard by shard in a random order."""
        shards = list(self.ref["shards"])
        self.rnd.shuffle(shards)
        for shard in shards:
            got = load_file(str(self.mnt / shard))
            if got.keys() != self.ref["tensors"][shard].keys():
                self.mismatches.append(f"{shard}: tensor names differ")
            for name, t in got.items():
                self.check(shard, name, t)
            del got
            self.beat()

    def safe_open(self) -> None:
        """vLLM's pattern: each shard opened with safe_open, tensors taken in key-name order."""
        for shard in self.ref["shards"]:
            with safe_open(str(self.mnt / shard), framework="pt") as f:
                for name in sorted(f.keys()):
                    self.check(shard, name, f.get_tensor(name))
                    self.beat()

    def torch_mmap(self) -> None:
        """`torch.load(path, mmap=True)` of a torch zip checkpoint; every tensor read through the mapping."""
        file = self.ref["torch"]
        state = torch.load(str(self.mnt / file), mmap=True, weights_only=True)
        self.beat()
        if state.keys() != self.ref["tensors"][file].keys():
            self.mismatches.append(f"{file}: tensor names differ")
        for name, t in state.items():
            self.check(file, name, t)
            self.beat()

    def pread(self, count: int = 48) -> None:
        """Random `pread`s of 4 KiB .. 2 MiB over every file of the checkpoint, each compared with the source."""
        files = [*self.ref["shards"], self.ref["torch"]]
        fds = {f: os.open(self.mnt / f, os.O_RDONLY) for f in files}
        try:
            for _ in range(count):
                f = self.rnd.choice(files)
                size = self.ref["sizes"][f]
                length = self.rnd.randint(4096, 2 << 20)
                off = self.rnd.randrange(max(1, size - 1))
                with open(self.src / f, "rb") as s:
                    want = os.pread(s.fileno(), length, off)
                got = b""
                while len(got) < len(want):  # a short read is not an error: read on (an error then raises)
                    more = os.pread(fds[f], len(want) - len(got), off + len(got))
                    if not more:
                        break
                    got += more
                if got != want:
                    self.mismatches.append(f"{f}@{off}+{length}")
                self.bytes += len(got)
                self.beat()
        finally:
            for fd in fds.values():
                os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mount", type=Path, required=True)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--refs", type=Path, required=True)
    args = ap.parse_args()
    faulthandler.enable()  # a SIGBUS (read error in a mapping) leaves its traceback on stderr
    torch.set_num_threads(1)
    refs = json.loads(args.refs.read_text())
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        job = Job(args.mount, args.source, refs[spec["ckpt"]], spec["ckpt"], spec["seed"])
        error = None
        t0 = time.monotonic()
        try:
            if spec.get("drop"):
                job.drop_page_cache()
            getattr(job, spec["kind"])()
        except Exception as e:  # any failure ends this load; the parent classifies it
            error = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps({"done": True, "bytes": job.bytes, "mismatches": job.mismatches[:20],
                          "n_mismatches": len(job.mismatches), "error": error,
                          "seconds": time.monotonic() - t0}), flush=True)


if __name__ == "__main__":
    main()
