"""Local faults through real mounts (SeaweedFS S3): crashes, damaged cache and index, a full or tiny
cache, many processes, killed readers; and the security properties of the mount and its cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs.cache import block_hash
from modelfs.index import ChunkIndex
from modelfs.mount import alive, is_mounted, is_stale
from tests.conftest import Checkpoint, Mount, requires_fuse
from tests.conftest import sha256_file as sha

pytestmark = [requires_fuse, pytest.mark.mount, pytest.mark.s3]

MiB = 1 << 20


def hf_shards(checkpoint: Checkpoint) -> list[str]:
    return sorted(f for f in checkpoint.files() if f.startswith(checkpoint.hf_dir) and f.endswith(".safetensors"))


def assert_identical(m: Mount, checkpoint: Checkpoint, files: list[str] | None = None) -> None:
    for f in files or sorted(checkpoint.files()):
        assert sha(m.path / f) == sha(checkpoint.root / f), f


def block_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "blocks").rglob("*") if p.is_file()]


def blocks_bytes(cache_dir: Path) -> int:
    """Bytes of block files (temp files included) right now; files evicted while we look count as gone."""
    total = 0
    for p in (cache_dir / "blocks").rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if p.is_file():
                total += p.stat().st_size
    return total


def check_index_consistent(cache_dir: Path) -> int:
    """Every extent the index names has a complete block whose content matches its hash."""
    idx = ChunkIndex(str(cache_dir / "index"), 1 << 30)
    try:
        blocks = {p.name: p for p in block_files(cache_dir)}
        n = 0
        for vid in idx.versions():
            for _off, (digest, length) in idx.extents(vid).items():
                path = blocks.get(digest.hex())
                assert path is not None, f"index names missing block {digest.hex()}"
                data = path.read_bytes()
                assert len(data) == length and block_hash(data) == digest, f"partial block {path}"
                n += 1
        return n
    finally:
        idx.close()


@pytest.fixture
def s3(seaweed: object, s3_checkpoint: str) -> tuple[str, dict[str, str]]:
    return s3_checkpoint, seaweed.env()  # type: ignore[attr-defined]


def test_kill_9_during_prefetch_then_restart_is_clean(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                                      mounter: Callable[..., Mount]) -> None:
    source, env = s3
    m = mounter(source, env=env)
    f = open(m.path / checkpoint.hf_dir / "model.safetensors.index.json", "rb")  # noqa: SIM115
    f.read()  # schedules every shard: heavy prefetch
    deadline = time.monotonic() + 60
    while not (m.stats()["gets"] >= 3 and m.stats()["fetches_in_flight"] > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    st = m.stats()
    assert st["gets"] >= 3 and st["fetches_in_flight"] > 0, st  # killed in the middle of fetching
    os.kill(m.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        f.close()  # the daemon is gone: ECONNABORTED
    deadline = time.monotonic() + 30
    while alive(m.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(m.pid)
    assert is_mounted(str(m.path)) and is_stale(str(m.path))
    # What a kill in the middle of a block write leaves (whether or not this kill landed in one): a temp
    # file beside the final name. The restart must sweep it, and never serve or index it.
    left = [p for p in block_files(m.cache_dir) if ".tmp." in p.name]
    some_block = next(p for p in block_files(m.cache_dir) if ".tmp." not in p.name)
    planted = some_block.with_name(f"{'ab' * 16}.tmp.{m.pid}.7")
    planted.write_bytes(some_block.read_bytes()[:1000])
    again = m.remount()  # clears the stale mount by itself
    assert not is_stale(str(again.path))
    assert not [p for p in block_files(m.cache_dir) if ".tmp." in p.name], (left, planted)
    assert_identical(again, checkpoint)
    again.umount()
    assert check_index_consistent(m.cache_dir) > 0


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_block_is_detected_refetched_and_counted(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                                         mounter: Callable[..., Mount], damage: str) -> None:
    source, env = s3
    m = mounter(source, env=env, args=["-o", "prefetch.whole_file=false", "-o", "prefetch.checkpoint_sets=false",
                                       "-o", "mount.passthrough=off"])  # the READ path loads the bad blocks
    shard = hf_shards(checkpoint)[0]
    (m.path / shard).read_bytes()
    m.umount()
    victims = sorted(block_files(m.cache_dir), key=lambda p: p.name)[:2]
    for p in victims:
        raw = bytearray(p.read_bytes())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0x40
        else:
            raw = raw[: len(raw) // 3]
        p.write_bytes(bytes(raw))
    again = m.remount()
    assert_identical(again, checkpoint, [shard])
    stats = again.stats()
    assert stats["corrupt_blocks"] == 2 and stats["gets"] == 2, stats


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


def test_cache_quota_smaller_than_one_shard(s3: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                            mounter: Callable[..., Mount]) -> None:
    quota = 16 * MiB  # each shard is 24 MiB
    source, env = s3
    m = mounter(source, env=env, args=["-o", f"cache.max_size={quota}", "-o", "cache.min_free=0"])
    peak = 0
    for f in sorted(checkpoint.files()):
        with open(m.path / f, "rb") as fh:
            h = hashlib.sha256()
            while chunk := fh.read(MiB):
                h.update(chunk)
                peak = max(peak, blocks_bytes(m.cache_dir))
        assert h.hexdigest() == sha(checkpoint.root / f), f
    stats = m.stats()
    assert peak <= quota and stats["bytes_in_cache"] <= quota, (peak, stats)
    assert stats["evicted_bytes"] > 0


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
    blocks = block_files(m.cache_dir)
    (m.path / checkpoint.torch_file).read_bytes()
    blocks = block_files(m.cache_dir)
    assert blocks and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in blocks)
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in (m.cache_dir / "blocks").rglob("*") if d.is_dir())

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
    for key in HOSTILE:
        try:
            client.put_object(Bucket="models", Key=prefix + key, Body=key.encode())
        except Exception:
            pass
    stored = [o["Key"][len(prefix):] for o in client.list_objects_v2(Bucket="models", Prefix=prefix)["Contents"]]
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
    safe = {"both/child.bin", "ok.bin", "sp ace.bin"}
    assert {k for k in safe if k in stored} <= set(seen)
    for rel, data in seen.items():  # each visible file is one uploaded object (the server may normalize keys)
        assert data == rel.encode() if rel in safe else data in {k.encode() for k in HOSTILE}, rel
    assert (m.path / "both").is_dir() and os.listdir(m.path).count("both") == 1  # file and prefix: the directory
    assert "n" * 300 + ".bin" not in seen and "marker" not in seen
    m.umount()
    log = (m.cache_dir / "modelfs.log").read_text()
    hidden = [line for line in log.splitlines() if "hidden" in line or "also a prefix" in line]
    assert hidden and len(hidden) == len(set(hidden_key(line) for line in hidden))
    allowed = {"blocks", "backing", "index", "lock", "modelfs.log"}
    assert set(os.listdir(m.cache_dir)) <= allowed


def hidden_key(line: str) -> str:
    return line.split("key ", 1)[1].rsplit(" hidden", 1)[0].rsplit(" a key that", 1)[0]
