"""Local faults through real mounts (SeaweedFS S3): crashes, damaged cache and index, a full or tiny
cache, many processes, killed readers; and the security properties of the mount and its cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import botocore.exceptions
import pytest

from modelfs.cache.diskio import punch
from modelfs.catalog.index import ChunkIndex
from modelfs.digest import content_hash
from modelfs.service.mount import alive, is_mounted, is_stale
from tests.conftest import Checkpoint, Mount, eventually, requires_fuse
from tests.conftest import sha256_file as sha
from tests.support.faultproxy import FaultProxy
from tests.support.seaweed import SeaweedServer

pytestmark = [requires_fuse, pytest.mark.mount, pytest.mark.s3]

MiB = 1 << 20
EXTENT = 8 * MiB  # cache.extent_size's default: files with no manifest are cut at these offsets
HEX = re.compile(r"[0-9a-f]{32}")


def hf_shards(checkpoint: Checkpoint) -> list[str]:
    return sorted(f for f in checkpoint.files() if f.startswith(checkpoint.hf_dir) and f.endswith(".safetensors"))


def assert_identical(m: Mount, checkpoint: Checkpoint, files: list[str] | None = None) -> None:
    for f in files or sorted(checkpoint.files()):
        assert sha(m.path / f) == sha(checkpoint.root / f), f


def cache_files(cache_dir: Path) -> list[Path]:
    """Everything in the cache's `files/` directory (version files, and whatever else lies there)."""
    root = cache_dir / "files"
    return sorted(root.iterdir()) if root.is_dir() else []


def allocated(cache_dir: Path) -> int:
    """Bytes the filesystem allocated for the files under `files/` right now (st_blocks: a sparse version file
    counts only the extents it holds); files deleted while we look count as gone."""
    total = 0
    for p in cache_files(cache_dir):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_blocks * 512
    return total


def idle(m: Mount) -> bool:
    st = m.stats()
    return st["fetches_in_flight"] == 0 and st["prefetch_queue"] == 0


def read_index(cache_dir: Path) -> tuple[dict[bytes, dict[int, tuple[bytes, int]]], dict[bytes, dict[str, object]]]:
    """(present extents, version records) of the cache's index; no daemon may run on it."""
    idx = ChunkIndex(str(cache_dir / "index"), 1 << 30)
    try:
        return idx.present(), idx.versions()
    finally:
        idx.close()


def version_of(cache_dir: Path, rel: str) -> tuple[bytes, dict[int, tuple[bytes, int]]]:
    """The version id of the source file `rel` and its present extents (offset -> (hash, length))."""
    present, versions = read_index(cache_dir)
    found = [vid for vid, rec in versions.items() if str(rec["key"]) == rel and vid in present]
    assert len(found) == 1, (rel, [(rec["key"], vid in present) for vid, rec in versions.items()])
    return found[0], present[found[0]]


def check_cache_consistent(cache_dir: Path, swept: bool = True) -> int:
    """Every extent the index says is present has bytes in its version file (`files/<vid hex>`, of the
    version's size) that hash to the recorded hash; returns how many. With `swept` (after a daemon's start
    sweep), `files/` holds nothing else: only files named by 32 hex chars that have present extents."""
    present, versions = read_index(cache_dir)
    n = 0
    for vid, extents in present.items():
        path = cache_dir / "files" / vid.hex()
        assert path.is_file(), f"the index has {len(extents)} extents of {vid.hex()} present, but no file"
        assert path.stat().st_size == int(str(versions[vid]["size"])), path
        with open(path, "rb") as f:
            for off, (digest, length) in sorted(extents.items()):
                data = os.pread(f.fileno(), length, off)
                assert len(data) == length and content_hash(data) == digest, \
                    f"{path.name}: the extent at {off} ({length} bytes) is present in the index but not in the file"
                n += 1
    if swept:
        names = [p.name for p in cache_files(cache_dir)]
        assert all(HEX.fullmatch(name) for name in names), names
        assert set(names) == {vid.hex() for vid in present}, (names, [vid.hex() for vid in present])
    return n


def flip(path: Path, offset: int) -> None:
    """Change one byte of a cache file in place, as bit rot or a stray write would."""
    with open(path, "r+b") as f:
        old = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([old[0] ^ 0x40]), offset)


@pytest.fixture
def s3(seaweed: object, s3_checkpoint: str) -> tuple[str, dict[str, str]]:
    return s3_checkpoint, seaweed.env()  # type: ignore[attr-defined]


def test_kill_9_during_prefetch_then_restart_is_clean(seaweed: SeaweedServer, s3_checkpoint: str, proxy: FaultProxy,
                                                      checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    # The origin behind a paced link (16 MiB/s): the prefetch of the set takes seconds, so the kill lands while
    # extents are being written (GETs of adjacent extents are one request now, and loopback SeaweedFS serves
    # the whole set in a blink).
    proxy.link(bandwidth=16 * MiB)
    m = mounter(s3_checkpoint, env={**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url})
    f = open(m.path / checkpoint.hf_dir / "model.safetensors.index.json", "rb")  # noqa: SIM115
    f.read()  # schedules every shard: heavy prefetch

    def mid_fetch() -> bool:
        st = m.stats()
        return st["fetches_in_flight"] > 0 and st["bytes_in_cache"] >= 2 * EXTENT

    eventually(mid_fetch, limit=60)
    st = m.stats()
    # Killed in the middle of fetching, with some extents written already.
    assert st["fetches_in_flight"] > 0 and st["bytes_in_cache"] >= 2 * EXTENT, st
    os.kill(m.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        f.close()  # the daemon is gone: ECONNABORTED
    deadline = time.monotonic() + 30
    while alive(m.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(m.pid)
    assert is_mounted(str(m.path)) and is_stale(str(m.path))
    # What the kill left: every extent the index says is present is whole and right in its file (its entry is
    # committed only after its bytes were written, and a killed process loses no byte it wrote).
    assert check_cache_consistent(m.cache_dir, swept=False) > 0
    # What a kill at other steps leaves, planted whether or not this kill landed there: a version file made
    # before its first extent was committed (no entry names it), the scratch files of the start's reflink
    # probe, and bytes written into a version file whose entry was never committed (garbage here). The
    # restart must sweep the files, and never serve or index what no entry names.
    unnamed = m.cache_dir / "files" / ("ab" * 16)
    unnamed.write_bytes(os.urandom(3 * MiB))
    probe = m.cache_dir / "files" / f"probe.tmp.{m.pid}.0"
    probe.write_bytes(bytes(4096))
    present, _ = read_index(m.cache_dir)
    vid, extents = next(iter(sorted(present.items())))
    start, (_, length) = min(extents.items())
    idx = ChunkIndex(str(m.cache_dir / "index"), 1 << 30)
    try:
        idx.unmark([(vid, start)])  # as if killed between the write and its commit
    finally:
        idx.close()
    with open(m.cache_dir / "files" / vid.hex(), "r+b") as fh:
        os.pwrite(fh.fileno(), os.urandom(length), start)
    proxy.link()  # the origin at full speed again
    again = m.remount()  # clears the stale mount by itself
    assert not is_stale(str(again.path))
    left = [p.name for p in cache_files(m.cache_dir)]
    assert unnamed.name not in left and probe.name not in left, left  # swept at start
    assert all(HEX.fullmatch(name) for name in left), left
    assert_identical(again, checkpoint)
    again.umount()
    assert check_cache_consistent(m.cache_dir) > 0


def damage_extent(path: Path, start: int, length: int, how: str) -> None:
    """flip: one byte in the middle changed; hole: the extent's second half gone (punched out: it reads as
    zeros, as what a truncated block file used to lose); truncate: the file cut in the middle of the extent."""
    if how == "flip":
        flip(path, start + length // 2)
    elif how == "hole":
        lo = (start + length // 2) // 4096 * 4096
        with open(path, "r+b") as f:
            punch(f.fileno(), lo, start + length - lo)
    else:
        os.truncate(path, start + length // 2)


@pytest.mark.parametrize("path", ["read", "passthrough"])
@pytest.mark.parametrize("damage", ["flip", "hole", "truncate"])
def test_damaged_extent_is_detected_refetched_and_counted(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                                          mounter: Callable[..., Mount], damage: str,
                                                          path: str) -> None:
    """Two extents of a shard's cache file damaged while no daemon runs: the next daemon finds each at its first
    use (read: a READ of the extent; passthrough: the whole-file check before the kernel gets the file), drops
    it, fetches it again, and serves the right bytes. A file cut short is dropped whole at start."""
    if path == "passthrough" and "mount.passthrough=off" in os.environ.get("MODELFS_TEST_MOUNT_OPTIONS", ""):
        pytest.skip("the suite runs with passthrough off")
    source, env = s3
    args = ["-o", "prefetch.whole_file=false", "-o", "prefetch.checkpoint_sets=false"]
    if path == "read":
        args += ["-o", "mount.passthrough=off"]  # the READ path loads the bad extents
    m = mounter(source, env=env, args=args)
    shard = hf_shards(checkpoint)[0]
    (m.path / shard).read_bytes()
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    m.umount()
    vid, extents = version_of(m.cache_dir, shard)
    size = (checkpoint.root / shard).stat().st_size
    assert sum(n for _, n in extents.values()) == size and len(extents) >= 3, extents
    starts = sorted(extents)
    victims = [starts[0], starts[-1]]  # not adjacent: each is fetched again by a GET of its own
    cache_file = m.cache_dir / "files" / vid.hex()
    for start in victims if damage != "truncate" else victims[-1:]:
        damage_extent(cache_file, start, extents[start][1], damage)
    again = m.remount()
    assert_identical(again, checkpoint, [shard])
    stats = again.stats()
    if damage == "truncate":
        # The file is not the version's size: dropped whole at start, nothing of it served; at least the
        # extent that lost bytes is fetched again.
        assert stats["gets"] >= 1 and stats["bytes_fetched"] >= extents[victims[-1]][1], stats
    else:
        refetched = sum(extents[s][1] for s in victims)
        assert stats["corrupt_extents"] == 2 and stats["gets"] == 2, stats
        assert stats["bytes_fetched"] == refetched, stats
        assert stats["files_corrupt"] == (1 if path == "passthrough" else 0), stats
    assert stats["passthrough_opens"] == 0, stats  # the damaged file was served through the daemon
    assert eventually(lambda: idle(again)), again.stats()
    again.umount()
    assert check_cache_consistent(m.cache_dir) > 0  # the damage is gone from the cache, not only from the READs


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_garbage_or_truncated_index_is_rebuilt_and_mounts(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                                          mounter: Callable[..., Mount], damage: str) -> None:
    source, env = s3
    m = mounter(source, env=env)
    shard = hf_shards(checkpoint)[0]
    (m.path / shard).read_bytes()
    m.umount()
    data = m.cache_dir / "index" / "data.mdb"
    if damage == "garbage":
        data.write_bytes(os.urandom(data.stat().st_size))
    else:
        with open(data, "r+b") as f:
            f.truncate(4096)
    again = m.remount()
    assert_identical(again, checkpoint)
    assert list(m.cache_dir.glob("index.corrupt-*"))  # the damaged one is kept aside, not served
    again.umount()
    # What the lost index described is named by nothing now: swept at start, or written anew; what the cache
    # holds after the rebuild, the rebuilt index names, and rightly.
    assert check_cache_consistent(m.cache_dir) > 0


def test_cache_quota_smaller_than_one_shard(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                            mounter: Callable[..., Mount]) -> None:
    """Loads stay right under a quota smaller than one shard (24 MiB: three extents), and the disk the cache
    files take stays within it. Bound on what is allocated on disk (st_blocks) while loads run: the quota plus
    one extent. Room is made, and reserved, before an extent is written, so the extents the cache counts stay
    within the quota (`bytes_in_cache` is checked against the quota itself); the extent of slack is for what
    measuring the files one after the other, while the daemon punches out one extent and writes the next,
    can see beyond that (a file measured before a punch and another after the write that followed it), and
    for each extent's edges rounded up to filesystem blocks (a few KiB). Once the daemon is idle the files
    take no more than the quota, but for that rounding (a block per file)."""
    quota = 16 * MiB  # each shard is 24 MiB
    source, env = s3
    m = mounter(source, env=env, args=["-o", f"cache.max_size={quota}", "-o", "cache.min_free=0"])
    peak = 0
    for f in sorted(checkpoint.files()):
        with open(m.path / f, "rb") as fh:
            h = hashlib.sha256()
            while chunk := fh.read(MiB):
                h.update(chunk)
                peak = max(peak, allocated(m.cache_dir))
        assert h.hexdigest() == sha(checkpoint.root / f), f
    stats = m.stats()
    assert peak <= quota + EXTENT and stats["bytes_in_cache"] <= quota, (peak, stats)
    assert stats["evicted_bytes"] > 0
    assert eventually(lambda: idle(m)), m.stats()
    stats = m.stats()
    rounding = 4096 * len(cache_files(m.cache_dir))
    assert allocated(m.cache_dir) <= quota + rounding and stats["bytes_in_cache"] <= quota, \
        (allocated(m.cache_dir), stats)


@pytest.fixture
def tiny_cache_fs(tmpfs: Callable[..., Path]) -> Path:
    """A real 20 MiB tmpfs for the cache dir: smaller than the checkpoint, so it fills up."""
    return tmpfs("tinyfs", "size=20m")


def test_cache_filesystem_that_fills_up(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                        mounter: Callable[..., Mount], tiny_cache_fs: Path) -> None:
    source, env = s3
    cache_dir = tiny_cache_fs / "cache"
    m = mounter(source, env=env, cache_dir=cache_dir, args=["-o", "cache.min_free=0"])
    assert_identical(m, checkpoint)
    stats = m.stats()
    assert stats["evicted_bytes"] > 0 or stats["cache_full_skips"] > 0, stats
    log = (cache_dir / "modelfs.log").read_text()
    assert "Traceback" not in log and "internal error" not in log
    assert eventually(lambda: idle(m)), m.stats()
    m.umount()
    # Writes that met a full disk left nothing the index calls present that is not in its file.
    check_cache_consistent(cache_dir)


MIXED_READER = """
import hashlib, mmap, random, sys
root, mode, seed, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
random.Random(seed).shuffle(files)
for f in files:
    with open(f"{root}/{f}", "rb") as fh:
        if mode == "mmap":
            with mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
                print(f, hashlib.sha256(m).hexdigest())
        else:
            h = hashlib.sha256()
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            print(f, h.hexdigest())
"""


def test_eight_processes_mixing_mmap_and_read(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                              mounter: Callable[..., Mount]) -> None:
    source, env = s3
    m = mounter(source, env=env)
    files = sorted(checkpoint.files())
    want = {f: sha(checkpoint.root / f) for f in files}
    procs = [subprocess.Popen([sys.executable, "-c", MIXED_READER, str(m.path), "mmap" if i % 2 else "read",
                               str(i), *files[i % 2:]], stdout=subprocess.PIPE, text=True) for i in range(8)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        got = dict(line.split() for line in out.splitlines())
        assert got == {f: want[f] for f in got} and got
    unique = sum(checkpoint.files().values())
    stats = m.stats()
    assert stats["bytes_fetched"] <= 1.05 * unique, stats
    log = (m.cache_dir / "modelfs.log").read_text()
    assert "ReadersFull" not in log and "Traceback" not in log


def test_mount_options_owner_and_modes(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root))
    opts = next(line.split()[3].split(",") for line in Path("/proc/mounts").read_text().splitlines()
                if line.split()[1] == str(m.path))
    assert {"ro", "nosuid", "nodev"} <= set(opts) and "allow_other" not in opts
    assert "default_permissions" in opts
    f = m.path / checkpoint.torch_file
    assert stat.S_IMODE(f.stat().st_mode) == 0o444 and stat.S_IMODE(m.path.stat().st_mode) == 0o555
    assert (f.stat().st_uid, f.stat().st_gid) == (os.getuid(), os.getgid())
    cache_mode = stat.S_IMODE(m.cache_dir.stat().st_mode)
    assert cache_mode == 0o700, oct(cache_mode)
    (m.path / checkpoint.torch_file).read_bytes()
    files = cache_files(m.cache_dir)
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files
    dirs = [d for d in m.cache_dir.rglob("*") if d.is_dir()]
    assert m.cache_dir / "files" in dirs and all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in dirs), dirs

    custom = mounter(str(checkpoint.root), args=["-o", "mount.uid=4321", "-o", "mount.gid=4322",
                                                 "-o", "mount.file_mode=0440", "-o", "mount.dir_mode=0550"])
    st = (custom.path / checkpoint.torch_file).stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4322, 0o440)
    assert stat.S_IMODE(custom.path.stat().st_mode) == 0o550


def _as_nobody(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=drop, timeout=60)


def test_other_users_are_refused_unless_allow_other(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    public = Path(tempfile.mkdtemp(prefix="modelfs-allow-other-", dir="/tmp"))  # pytest's tmp dirs are 0700
    public.chmod(0o755)
    try:
        private = mounter(str(checkpoint.root), path=public / "private")
        shared = mounter(str(checkpoint.root), args=["--allow-other"], path=public / "shared")
        denied = _as_nobody(["ls", "-1", str(private.path)])  # a system binary: `nobody` cannot run root's venv
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        allowed = _as_nobody(["ls", "-1", str(shared.path)])
        assert allowed.returncode == 0, allowed.stderr
        assert sorted(allowed.stdout.split()) == sorted(os.listdir(checkpoint.root))
        private.umount()
        shared.umount()
    finally:
        if not any(is_mounted(str(public / n)) for n in ("private", "shared")):
            shutil.rmtree(public, ignore_errors=True)


def test_credentials_never_in_logs(seaweed: object, s3_checkpoint: str, checkpoint: Checkpoint,
                                   mounter: Callable[..., Mount]) -> None:
    env = dict(seaweed.env())  # type: ignore[attr-defined]
    secret = env["AWS_SECRET_ACCESS_KEY"]
    m = mounter(s3_checkpoint, env=env, args=["--log-level", "DEBUG"])
    assert_identical(m, checkpoint, [checkpoint.torch_file])
    # Also an error path, in the foreground (logging to stderr): a bucket these credentials cannot see.
    never = m.path.parent / "never"
    never.mkdir()
    r = subprocess.run([sys.executable, "-m", "modelfs", "mount", s3_checkpoint.replace("models", "no-such-bucket"),
                        str(never), "--cache-dir", str(m.path.parent / "never-cache"), "--log-level", "DEBUG",
                        "--foreground"], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no-such-bucket" in r.stderr and secret not in r.stderr
    m.umount()
    log = (m.cache_dir / "modelfs.log").read_text()
    assert " DEBUG " in log
    assert secret not in log
    assert "X-Amz-Signature=" not in log.replace("X-Amz-Signature=[redacted]", "")
    assert "Signature=" not in log.replace("Signature=[redacted]", "")


HOSTILE = ["a//double.bin", "./dot.bin", "../up.bin", "x/../../escape.bin", "/lead.bin", "marker/",
           "n" * 300 + ".bin", "both", "both/child.bin", "ok.bin", "sp ace.bin"]


def test_hostile_keys_never_escape_and_are_logged_once(seaweed: object, tmp_path: Path,
                                                       mounter: Callable[..., Mount]) -> None:
    client = seaweed.client()  # type: ignore[attr-defined]
    prefix = f"hostile-{os.getpid()}-{time.monotonic_ns()}/"
    refused: dict[str, str] = {}
    for key in HOSTILE:
        try:
            client.put_object(Bucket="models", Key=prefix + key, Body=key.encode())
        except botocore.exceptions.ClientError as e:  # a key the server itself will not store
            refused[key] = str(e)
    stored = [o["Key"][len(prefix):] for o in client.list_objects_v2(Bucket="models", Prefix=prefix)["Contents"]]
    safe = {"both/child.bin", "ok.bin", "sp ace.bin"}
    assert safe <= set(stored) and not safe & set(refused), (stored, refused)  # what the checks below need
    assert len(stored) >= 6, stored  # most hostile keys reached the store: the mount meets them
    m = mounter(f"s3://models/{prefix}", env=seaweed.env(), args=["-o", "mount.metadata_ttl=0"])  # type: ignore[attr-defined]
    seen: dict[str, bytes] = {}
    for _ in range(2):  # list twice: hidden keys are logged once, not per listing
        for dirpath, dirs, files in os.walk(m.path):
            for name in dirs + files:
                assert name not in (".", "..") and "/" not in name and len(name.encode()) <= 255
                assert os.path.realpath(os.path.join(dirpath, name)).startswith(str(m.path) + "/")
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), m.path)
                seen[rel] = Path(dirpath, name).read_bytes()
    assert safe <= set(seen)
    for rel, data in seen.items():  # each visible file is one uploaded object (the server may normalize keys)
        assert data == rel.encode() if rel in safe else data in {k.encode() for k in HOSTILE}, rel
    assert (m.path / "both").is_dir() and os.listdir(m.path).count("both") == 1  # file and prefix: the directory
    assert "n" * 300 + ".bin" not in seen and "marker" not in seen
    m.umount()
    log = (m.cache_dir / "modelfs.log").read_text()
    hidden = [line for line in log.splitlines() if "hidden" in line or "also a prefix" in line]
    assert hidden and len(hidden) == len(set(hidden_key(line) for line in hidden))
    allowed = {"files", "index", "lock", "modelfs.log"}
    assert set(os.listdir(m.cache_dir)) <= allowed


def hidden_key(line: str) -> str:
    return line.split("key ", 1)[1].rsplit(" hidden", 1)[0].rsplit(" a key that", 1)[0]
