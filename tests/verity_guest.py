"""Run inside the fs-verity VM by tests/test_verity.py (root, a stock kernel with fs-verity, /dev/vda a blank
disk): an ext4 with verity on it holds the cache; a real modelfs mount serves a local source directory.
Prints one line `RESULT {json}` with what it saw; exits non-zero (with the reason) on a wrong byte or a broken
step. Kept small: the VM is emulated (no KVM), every step is slow."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from modelfs.cache import integrity
from tests.support.diskfault import LoopFs, corrupt_under_fs

MiB = 1 << 20
DISK = "/dev/vda"
ROOT = Path("/run/verity")
SRC, MNT, FS = ROOT / "src", ROOT / "mnt", ROOT / "disk"
CACHE = FS / "cache"
SIZE = 6 * MiB + 12345  # the first extent (8 MiB by default) is the whole file


def sh(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode:
        sys.exit(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}")


def mount(*opts: str) -> subprocess.Popen[bytes]:
    """The daemon in the foreground (one interpreter start, not two: each costs seconds under emulation)."""
    p = subprocess.Popen([sys.executable, "-P", "-m", "modelfs", "mount", str(SRC), str(MNT), "--cache-dir",
                          str(CACHE), "--foreground", "-o", "cache.min_free=0", *opts])
    deadline = time.monotonic() + 300
    while not os.path.ismount(MNT):
        if p.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the daemon did not mount (exit {p.poll()})")
        time.sleep(0.2)
    return p


def umount(p: subprocess.Popen[bytes]) -> None:
    """Unmount and wait for the daemon's exit (it seals complete files as it closes the cache)."""
    sh("fusermount3", "-u", str(MNT))
    if p.wait(timeout=300):
        sys.exit(f"the daemon exited with {p.returncode}")


def stats() -> dict[str, int]:
    st: dict[str, int] = json.loads(os.getxattr(MNT, "user.modelfs.stats"))
    return st


def read(ref: bytes) -> dict[str, object]:
    """Read the file through the mount in 1 MiB preads, as a reader that loops on short reads does."""
    wrong, eio = [], []
    fd = os.open(MNT / "model.safetensors", os.O_RDONLY)
    try:
        off = 0
        while off < len(ref):
            try:
                got = os.pread(fd, min(MiB, len(ref) - off), off)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                eio.append(off)
                off = (off // 4096 + 1) * 4096  # on past the failed block
                continue
            if not got:
                break
            if got != ref[off:off + len(got)]:
                wrong.append(off)
            off += len(got)
    finally:
        os.close(fd)
    return {"wrong": wrong, "eio": eio}


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def main() -> None:
    for d in (SRC, MNT, FS):
        d.mkdir(parents=True, exist_ok=True)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "verity", DISK)
    sh("mount", DISK, str(FS))
    ref = os.urandom(SIZE)
    (SRC / "model.safetensors").write_bytes(ref)
    out: dict[str, object] = {"storage": integrity.probe(str(FS)).kind}

    p = mount("-o", "cache.scrub_rate=0")  # cold: fetched, written, checked; sealed (verity on) by umount at last
    out["cold"] = read(ref)
    umount(p)
    cache_file = next((CACHE / "files").iterdir())
    fd = os.open(cache_file, os.O_RDONLY)
    try:
        out["verity_digest"] = integrity.measure_verity(fd).hex()
    finally:
        os.close(fd)
    try:
        os.open(cache_file, os.O_RDWR)
        out["writable"] = True
    except OSError as e:
        out["writable"] = errno.errorcode.get(e.errno or 0, str(e))

    drop_caches()
    p = mount("-o", "cache.scrub_rate=0")  # a new daemon: trusts the file by MEASURE, reads nothing back
    out["restart"] = read(ref)
    out["restart_stats"] = {k: stats()[k] for k in ("files_trusted_sealed", "extents_verified", "passthrough_opens",
                                                   "storage_verifies")}
    umount(p)

    corrupt_under_fs(LoopFs(FS, Path(DISK), DISK, "ext4"), cache_file, 3 * MiB + 777)
    drop_caches()
    # The scrub starts once the daemon has been idle 10 s: after this first read.
    p = mount("-o", "cache.scrub_after=10", "-o", "cache.scrub_rate=1GiB")
    out["rotten"] = read(ref)  # EIO where the block rotted, never the wrong bytes
    deadline = time.monotonic() + 300
    while stats()["scrub_damaged"] < 1 and time.monotonic() < deadline:
        time.sleep(1)
    drop_caches()
    out["healed"] = read(ref)  # the next attempt: a new file, fetched again
    out["healed_stats"] = {k: stats()[k] for k in ("scrub_damaged", "corrupt_extents", "bytes_fetched")}
    umount(p)
    out["enable_s_per_gib"] = enable_cost()
    sh("umount", str(FS))
    print("RESULT " + json.dumps(out), flush=True)


def enable_cost(size: int = 32 * MiB) -> float:
    """Seconds to turn verity on per GiB of file (the kernel reads and SHA-256-hashes it; emulated CPU here)."""
    path = FS / "scratch"
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        began = time.perf_counter()
        integrity.enable_verity(fd)
        return (time.perf_counter() - began) * (1 << 30) / size
    finally:
        os.close(fd)
        path.unlink()


if __name__ == "__main__":
    main()
