"""Real mounts, local directory and SeaweedFS S3: tree, loaders, byte identity, warm remount, EROFS, CLI."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Checkpoint, Mount, cli, requires_fuse

pytestmark = [requires_fuse, pytest.mark.mount]

MiB = 1 << 20


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tree_sizes_and_ls(backend: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                           mounter: Callable[..., Mount]) -> None:
    source, env = backend
    m = mounter(source, env=env)
    seen = {p.relative_to(m.path).as_posix(): p.stat().st_size for p in m.path.rglob("*") if p.is_file()}
    assert seen == checkpoint.files()
    r = subprocess.run(["ls", "-lR", str(m.path)], capture_output=True, text=True)
    assert r.returncode == 0 and "model.safetensors.index.json" in r.stdout
    st = (m.path / checkpoint.torch_file).stat()
    assert st.st_mode & 0o777 == 0o444 and (m.path / "run42").stat().st_mode & 0o777 == 0o555
    if source.startswith("s3://"):  # the object's LastModified (upload time, 1 s resolution)
        import boto3

        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        head = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).head_object(
            Bucket=bucket, Key=prefix + checkpoint.torch_file)
        assert st.st_mtime == head["LastModified"].timestamp()
    else:
        assert abs(st.st_mtime - (checkpoint.root / checkpoint.torch_file).stat().st_mtime) < 1e-3
    assert os.path.isdir(m.path / checkpoint.hf_dir)
    with pytest.raises(FileNotFoundError):
        (m.path / "no-such-file").stat()


def test_loaders_give_identical_tensors(backend: tuple[str, dict[str, str]], checkpoint: Checkpoint,
                                        mounter: Callable[..., Mount]) -> None:
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    source, env = backend
    m = mounter(source, env=env)
    hf = m.path / checkpoint.hf_dir
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    loaded: dict[str, object] = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(hf / shard))
    assert loaded.keys() == checkpoint.safetensors.keys()
    for name, t in checkpoint.safetensors.items():
        assert torch.equal(loaded[name], t), name

    name, shard = next(iter(index["weight_map"].items()))
    with safe_open(hf / shard, framework="pt") as f:
        assert torch.equal(f.get_tensor(name), checkpoint.safetensors[name])
        big = max(f.keys(), key=lambda k: checkpoint.safetensors[k].numel())
        sl = f.get_slice(big)
        rows = sl.get_shape()[0]
        assert torch.equal(sl[rows // 3: rows // 2], checkpoint.safetensors[big][rows // 3: rows // 2])

    for kwargs in ({"mmap": True}, {}):
        state = torch.load(m.path / checkpoint.torch_file, weights_only=True, **kwargs)
        assert state.keys() == checkpoint.torch_state.keys()
        for k, t in checkpoint.torch_state.items():
            assert torch.equal(state[k], t), (kwargs, k)


def test_random_reads_and_mmap_slices_across_extent_edges(backend: tuple[str, dict[str, str]],
                                                          checkpoint: Checkpoint,
                                                          mounter: Callable[..., Mount]) -> None:
    source, env = backend
    m = mounter(source, env=env, args=["--extent-size", "1MiB"])
    rel = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    ref = (checkpoint.root / rel).read_bytes()
    rng = random.Random(42)
    with open(m.path / rel, "rb", buffering=0) as f:
        for _ in range(400):
            edge = rng.randrange(1, len(ref) // MiB + 1) * MiB
            off = max(0, edge + rng.randrange(-70_000, 70_000))
            size = rng.choice([1, 17, 4096, 65536, 300_000, 2 * MiB + 5])
            assert os.pread(f.fileno(), size, off) == ref[off:off + size], (off, size)
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            for _ in range(400):
                edge = rng.randrange(1, len(ref) // MiB + 1) * MiB
                lo = max(0, edge - rng.randrange(0, 9000))
                hi = min(len(ref), edge + rng.randrange(1, 9000))
                assert mm[lo:hi] == ref[lo:hi], (lo, hi)
        finally:
            mm.close()


def test_warm_remount_serves_everything_with_zero_gets(backend: tuple[str, dict[str, str]],
                                                       checkpoint: Checkpoint,
                                                       mounter: Callable[..., Mount]) -> None:
    source, env = backend
    m = mounter(source, env=env)
    expected = {k: (checkpoint.root / k).read_bytes() for k in checkpoint.files()}
    assert read_tree(m.path) == expected
    cold = m.stats()
    total = sum(len(v) for v in expected.values())
    assert cold["gets"] > 0 and cold["bytes_fetched"] == total
    m.umount()
    m = m.remount()
    assert read_tree(m.path) == expected
    warm = m.stats()
    assert warm["gets"] == 0 and warm["bytes_fetched"] == 0
    if "mount.passthrough=off" in os.environ.get("MODELFS_TEST_MOUNT_OPTIONS", ""):
        assert warm["bytes_served"] >= total  # every byte through the daemon, from the cache files
    else:  # every file complete in the cache: each open served by the kernel from its cache file
        assert warm["passthrough_opens"] == len(expected) and warm["bytes_served"] == 0, warm
    assert warm["bytes_in_cache"] == total


def test_every_mutation_is_erofs(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root))
    f = m.path / checkpoint.torch_file
    attempts: list[Callable[[], object]] = [
        lambda: os.open(f, os.O_RDWR),
        lambda: os.open(f, os.O_WRONLY | os.O_TRUNC),
        lambda: os.open(m.path / "new.bin", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.mkdir(m.path / "d"),
        lambda: os.unlink(f),
        lambda: os.rmdir(m.path / "run42"),
        lambda: os.rename(f, m.path / "x.pt"),
        lambda: os.chmod(f, 0o777),
        lambda: os.truncate(f, 0),
        lambda: os.utime(f, (0, 0)),
        lambda: os.symlink("x", m.path / "ln"),
        lambda: os.link(f, m.path / "hl"),
        lambda: os.setxattr(f, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, attempt
    assert (f.stat().st_size, f.read_bytes()[:4]) == ((checkpoint.root / checkpoint.torch_file).stat().st_size,
                                                      (checkpoint.root / checkpoint.torch_file).read_bytes()[:4])


def test_stats_and_umount_cli(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root))
    (m.path / checkpoint.torch_file).read_bytes()
    r = cli("stats", str(m.path))
    assert r.returncode == 0
    for counter in ("bytes_served", "bytes_fetched", "gets", "cache_hits", "cache_misses", "bytes_in_cache",
                    "dedup_bytes_saved"):
        assert counter in r.stdout
    data = json.loads(cli("stats", "--json", str(m.path)).stdout)
    assert data["bytes_fetched"] >= (checkpoint.root / checkpoint.torch_file).stat().st_size
    assert data["bytes_served"] + data["pushed_bytes"] or data["passthrough_opens"], data  # served either way
    r = cli("umount", str(m.path))
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(f"/proc/{m.pid}") or "Z" in Path(f"/proc/{m.pid}/stat").read_text().split()[2]
    r = cli("stats", str(m.path))
    assert r.returncode != 0 and r.stderr.count("\n") == 1


def test_mount_errors_are_one_line(tmp_path: Path, checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    afile = tmp_path / "afile"
    afile.write_text("x")
    live = mounter(str(checkpoint.root))
    cases = {
        "does not exist": ["mount", str(checkpoint.root), str(tmp_path / "missing")],
        "not a directory": ["mount", str(checkpoint.root), str(afile)],
        "not empty": ["mount", str(checkpoint.root), str(full)],
        "already mounted": ["mount", str(checkpoint.root), str(live.path)],
        "is not a directory": ["mount", str(tmp_path / "nosrc"), str(tmp_path)],
        "unknown key 'cache.bogus'": ["mount", str(checkpoint.root), str(tmp_path), "-o", "cache.bogus=1"],
        "missing bucket": ["mount", "s3:///x", str(tmp_path)],
    }
    for i, (msg, args) in enumerate(cases.items()):
        r = cli(*args, "--cache-dir", str(tmp_path / f"c{i}"))
        assert r.returncode != 0, msg
        assert msg in r.stderr and r.stderr.count("\n") == 1, (msg, r.stderr)
    assert read_tree(live.path)  # the live mount is untouched


def test_mount_from_config_file_with_endpoint_in_config(seaweed: object, s3_checkpoint: str, checkpoint: Checkpoint,
                                                        mounter: Callable[..., Mount], tmp_path: Path) -> None:
    """Source, endpoint and settings from --config; credentials from the environment only (boto3 chain)."""
    env = dict(seaweed.env())  # type: ignore[attr-defined]
    endpoint = env.pop("AWS_ENDPOINT_URL")
    env["AWS_ENDPOINT_URL"] = ""  # make sure the endpoint really comes from the file
    cfg = tmp_path / "modelfs.toml"
    cfg.write_text(f'[s3]\nendpoint_url = "{endpoint}"\naddressing_style = "path"\n'
                   '[cache]\nextent_size = "4MiB"\n[mount]\nmetadata_ttl = 5.0\n')
    m = mounter(s3_checkpoint, env=env, args=["--config", str(cfg)])
    rel = checkpoint.torch_file
    assert (m.path / rel).read_bytes() == (checkpoint.root / rel).read_bytes()
    size = (checkpoint.root / rel).stat().st_size
    extents = json.loads(os.getxattr(m.path / rel, "user.modelfs.extents"))["extents"]
    assert len(extents) == -(-size // (4 << 20)) and max(n for _, n, _ in extents) == 4 << 20  # from the file


def test_max_background_is_applied_through_fusectl(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """mount.max_background reaches the kernel: fusectl is mounted if it was not, and the connection's queue
    depth and congestion threshold are set and logged."""
    m = mounter(str(checkpoint.root), args=["-o", "mount.max_background=64"])
    conn = Path("/sys/fs/fuse/connections") / str(os.minor(os.stat(m.path).st_dev))
    assert (conn / "max_background").read_text().strip() == "64"
    assert (conn / "congestion_threshold").read_text().strip() == "48"
    log = (m.cache_dir / "modelfs.log").read_text()
    assert f"set {conn}/max_background = 64" in log
