"""CPU per MiB of modelfs's fetch path with boto3 (its S3 client) beside obstore, in one run.

One SeaweedFS on loopback holds a 1 GiB object. Two ways, each repeated and interleaved so drift on this
shared machine hits both alike, medians reported:

- the fetch path inside modelfs: `modelfs prefetch` of the object through the core (`ModelFS.warm`: ranged
  GETs into pooled buffers, xxh3, the version's cache file, LMDB records), no mount, a fresh cache each time, with the
  store being modelfs's `S3Store` (boto3) or the same store with its ranged GETs done by obstore;
- the client alone: 8 MiB ranged GETs by 8 threads into reusable buffers, boto3 (as `S3Store.read_into`
  does it) or obstore (`get_range`, then one copy into the buffer).

CPU = this process's utime + stime (every thread; the kernel's share of loopback TCP included). modelfs
adopts another client for ranged GETs only if it saves at least 25 % CPU per MiB here.

    python bench/s3clients.py [--size-mib 1024] [--reps 5]      (needs `pip install obstore`)
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
import trio

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.config import load_config
from modelfs.core import assemble
from modelfs.remote import ObjectInfo
from modelfs.remote.s3 import S3Store
from modelfs.stats import Stats
from tests.support.seaweed import REGION, SeaweedServer

BUCKET = "clients-bench"
KEY = "blob.bin"
RANGE = 8 << 20


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ObstoreRanges(S3Store):
    """modelfs's S3Store with its ranged GETs done by obstore (listing, HEAD and checks stay boto3)."""

    def __init__(self, endpoint: str, env: dict[str, str], cfg: object) -> None:
        import obstore
        from obstore.store import S3Store as Obs

        super().__init__(BUCKET, "", cfg)  # type: ignore[arg-type]
        self._get_range = obstore.get_range
        self._obs = Obs(BUCKET, endpoint=endpoint, access_key_id=env["AWS_ACCESS_KEY_ID"],
                        secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region=REGION,
                        client_options={"allow_http": True})

    def read_into(self, obj: ObjectInfo, start: int, views: Sequence[memoryview],
                  filled: Callable[[int], None] | None = None) -> None:
        data = memoryview(self._get_range(self._obs, self.prefix + obj.key, start=start,
                                          length=sum(len(v) for v in views)))
        pos = 0
        for k, v in enumerate(views):  # each view handed on before the next is filled (they may be one buffer)
            v[:] = data[pos:pos + len(v)]
            pos += len(v)
            if filled is not None:
                filled(k)


def warm_once(store: S3Store, work: Path) -> float:
    """CPU seconds of one `modelfs prefetch` of the object through the core, into a fresh cache."""
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = load_config(None, {"cache.dir": str(cache_dir), "cache.min_free": "0"})
    index = ChunkIndex(str(cache_dir / "index"), 1 << 30)
    cache = FileCache(str(cache_dir), index, store.domain, store.identity)
    core = assemble(cfg, store, index, cache, Stats())
    spent: list[float] = []

    async def main() -> None:
        async with core.serving() as nursery:
            node = await core.lookup(1, KEY)
            c0 = cpu()
            got = await core.warm(node.inode)
            spent.append(cpu() - c0)
            assert got["fetched"] == got["size"], got
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        cache.close()
        index.close()
    return spent[0]


def client_once(fetch: Callable[[int, memoryview], None], size: int) -> float:
    """CPU seconds of 8 MiB ranged GETs of the whole object by 8 threads into 8 reusable buffers."""
    bufs = [mmap.mmap(-1, RANGE) for _ in range(8)]
    free = list(bufs)
    lock = threading.Lock()

    def one(off: int) -> None:
        with lock:
            buf = free.pop()
        try:
            fetch(off, memoryview(buf)[:min(RANGE, size - off)])
        finally:
            with lock:
                free.append(buf)

    c0 = cpu()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(one, range(0, size, RANGE)))
    return cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="modelfs-s3clients-"))
    server = SeaweedServer(work / "weed").start()
    try:
        server.create_bucket(BUCKET)
        env = server.env()
        os.environ.update(env)
        with open(work / "blob", "wb") as f:
            f.write(os.urandom(size))
        cfg = load_config(None, {"s3.endpoint_url": server.endpoint_url}).s3
        boto = S3Store(BUCKET, "", cfg)
        boto.client.upload_file(str(work / "blob"), BUCKET, KEY)
        (work / "blob").unlink()
        obs = ObstoreRanges(server.endpoint_url, env, cfg)
        info = next(o for name, o in boto.list_dir("").objects if name == KEY)
        ways: dict[str, Callable[[], float]] = {
            "modelfs fetch path, boto3": lambda: warm_once(boto, work),
            "modelfs fetch path, obstore": lambda: warm_once(obs, work),
            "client alone, boto3": lambda: client_once(lambda off, v: boto.read_into(info, off, [v]), size),
            "client alone, obstore": lambda: client_once(lambda off, v: obs.read_into(info, off, [v]), size),
        }
        spent: dict[str, list[float]] = {k: [] for k in ways}
        for i in range(args.reps):
            for name, way in ways.items():
                t = time.perf_counter()
                spent[name].append(way())
                print(f"[{i + 1}/{args.reps}] {name}: {spent[name][-1]:.2f} CPU-s in {time.perf_counter() - t:.2f} s",
                      flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    mib = size / 2**20
    print(f"\n{args.size_mib} MiB in 8 MiB ranges, median of {args.reps}; CPU ms per MiB (this process, all threads)\n")
    print("| way | boto3 | obstore | obstore saves |")
    print("| --- | ---: | ---: | ---: |")
    for what in ("modelfs fetch path", "client alone"):
        b = statistics.median(spent[f"{what}, boto3"]) * 1000 / mib
        o = statistics.median(spent[f"{what}, obstore"]) * 1000 / mib
        print(f"| {what} | {b:.2f} | {o:.2f} | {1 - o / b:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
