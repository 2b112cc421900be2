"""Publish with manifests, then mount: shared tensors are fetched and stored once across versions.

Real SeaweedFS, real mount, real `modelfs publish`. A base checkpoint and variants: (a) a fine-tune
changing 25 % of the tensors, (b) the base with a longer `__metadata__` header (every offset moves),
(c) the base again under another prefix, and (d) a variant uploaded without a manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs.config import MiB
from modelfs.reads.prefetch import LOAD_GAP
from tests.conftest import BUCKET, Mount, cli, eventually, requires_fuse
from tests.conftest import sha256_file as sha
from tests.support.checkpoints import make_variant_set, write_raw_safetensors
from tests.support.diskfault import available, loop_btrfs
from tests.support.seaweed import SeaweedServer

pytestmark = [requires_fuse, pytest.mark.mount, pytest.mark.s3]



@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Local dirs base/, ft/, meta/, copy/, plain/; returns (root, bytes of changed tensors in ft)."""
    root = tmp_path_factory.mktemp("variants")
    return root, make_variant_set(root)


def test_publish_then_each_variant_fetches_only_what_changed(seaweed: SeaweedServer, variants: tuple[Path, int],
                                                            mounter: Callable[..., Mount]) -> None:
    from safetensors.torch import load_file

    root, changed = variants
    env = seaweed.env()
    seaweed.create_bucket(BUCKET)
    prefix = f"dedup-{os.getpid()}"
    for d in ("base", "ft", "meta", "copy"):
        r = cli("publish", str(root / d), f"s3://{BUCKET}/{prefix}/{d}", "-q", env=env)
        assert r.returncode == 0, r.stderr
        assert "published 2 files" in r.stdout
    seaweed.upload_dir(root / "plain", BUCKET, f"{prefix}/plain/")  # no manifest
    again = cli("publish", str(root / "base"), f"s3://{BUCKET}/{prefix}/base", "-q", "--verify", env=env)
    assert again.returncode == 0 and "published 0 files" in again.stdout and "matches" in again.stdout, again

    m = mounter(f"s3://{BUCKET}/{prefix}", env=env)
    assert sorted(os.listdir(m.path / "base")) == ["config.json", "model.safetensors"]  # manifest hidden
    size = (root / "base" / "model.safetensors").stat().st_size

    def load(d: str) -> tuple[int, int]:
        before = m.stats()
        got = load_file(m.path / d / "model.safetensors")
        want = load_file(root / d / "model.safetensors")
        assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)
        after = m.stats()
        return after["bytes_fetched"] - before["bytes_fetched"], after["bytes_in_cache"] - before["bytes_in_cache"]

    fetched, grown = load("base")
    assert fetched >= size * 0.98
    extents = len(json.loads(os.getxattr(m.path / "base" / "model.safetensors", "user.modelfs.extents"))["extents"])
    assert m.stats()["gets"] < extents / 2, (m.stats()["gets"], extents)  # adjacent extents: one GET
    du = cli("du", "--json", str(m.path / "ft"), env=env)
    assert du.returncode == 0, du.stderr
    assert json.loads(du.stdout)["total"]["to_fetch"] <= changed + 0.02 * size
    limits = {"ft": changed + 0.02 * size, "meta": 0.02 * size, "copy": 0.02 * size}
    for d, limit in limits.items():
        fetched, grown = load(d)
        assert fetched <= limit and grown <= limit, (d, fetched, grown, limit)
    assert sha(m.path / "plain" / "model.safetensors") == sha(root / "plain" / "model.safetensors")


def test_verify_reports_an_object_changed_after_publishing(seaweed: SeaweedServer, variants: tuple[Path, int],
                                                           mounter: Callable[..., Mount]) -> None:
    root, _ = variants
    env = seaweed.env()
    seaweed.create_bucket(BUCKET)
    prefix = f"verify-{os.getpid()}/base"
    url = f"s3://{BUCKET}/{prefix}"
    assert cli("publish", str(root / "base"), url, "-q", env=env).returncode == 0
    seaweed.client().put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b'{"changed": true}')
    r = cli("publish", "--verify", url, "-q", env=env)
    assert r.returncode == 1 and "config.json: object changed since it was published" in r.stderr, r.stderr
    # The mount no longer trusts that entry (ETag differs): the new bytes, read with fixed extents.
    m = mounter(url, env=env)
    assert (m.path / "config.json").read_bytes() == b'{"changed": true}'
    info = json.loads(os.getxattr(m.path / "config.json", "user.modelfs.extents"))
    assert info["manifest"] is False
    assert json.loads(os.getxattr(m.path / "model.safetensors", "user.modelfs.extents"))["manifest"] is True


def fine_tune_pair(root: Path, tensors: int = 20, changed_every: int = 10) -> tuple[int, int]:
    """base/ and ft/: a fine-tune with every `changed_every`-th tensor new (10 %), the same header length, so
    every shared tensor sits at the same offset in both files. Returns (ft's size, bytes ft changed)."""
    rnd = random.Random(11)
    sizes = [rnd.choice([700_001, 1_500_003, 3_000_017]) for _ in range(tensors)]
    base = {f"layer{i}.weight": os.urandom(n) for i, n in enumerate(sizes)}
    ft = {k: (os.urandom(len(v)) if i % changed_every == 0 else v) for i, (k, v) in enumerate(base.items())}
    write_raw_safetensors(root / "base" / "model.safetensors", base)
    write_raw_safetensors(root / "ft" / "model.safetensors", ft)
    return (root / "ft" / "model.safetensors").stat().st_size, sum(len(v) for k, v in ft.items() if v != base[k])


def publish(seaweed: SeaweedServer, root: Path, prefix: str) -> str:
    seaweed.create_bucket(BUCKET)
    for d in ("base", "ft"):
        r = cli("publish", str(root / d), f"s3://{BUCKET}/{prefix}/{d}", "-q", env=seaweed.env())
        assert r.returncode == 0, r.stderr
    return f"s3://{BUCKET}/{prefix}"


def load(m: Mount, root: Path, d: str) -> None:
    """load_file through the mount, every tensor equal to the source, page cache dropped first."""
    from safetensors.torch import load_file

    Path("/proc/sys/vm/drop_caches").write_text("3")
    got, want = load_file(m.path / d / "model.safetensors"), load_file(root / d / "model.safetensors")
    assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)
    assert eventually(lambda: m.stats()["fetches_in_flight"] == 0 and m.stats()["prefetch_queue"] == 0)


def passthrough_open(m: Mount, d: str) -> bool:
    """Whether a new open of the file is served by the kernel (counted by the daemon as it answers)."""
    before = m.stats()["passthrough_opens"]
    with open(m.path / d / "model.safetensors", "rb") as f:
        f.read(1)
    return m.stats()["passthrough_opens"] == before + 1


def btrfs_used(path: Path) -> int:
    """Bytes of disk the files under `path` take on btrfs, extents shared between them counted once."""
    os.sync()
    r = subprocess.run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)], capture_output=True, text=True,
                       check=True)
    _total, exclusive, shared, _ = r.stdout.splitlines()[-1].split(None, 3)
    return int(exclusive) + int(shared)


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None or available() is not None,
                    reason="needs mkfs.btrfs (btrfs-progs), root and loop devices")
def test_a_fine_tune_on_btrfs_shares_its_base_s_extents_on_disk(seaweed: SeaweedServer, tmp_path: Path,
                                                                mounter: Callable[..., Mount]) -> None:
    """On a cache filesystem that shares extents, a fine-tune sharing 90 % of its base's tensors, both loaded,
    adds little more than its new tensors to the disk, and is whole in its own file: served by passthrough."""
    root = tmp_path / "src"
    size, changed = fine_tune_pair(root)
    url = publish(seaweed, root, f"btrfs-{os.getpid()}")
    with loop_btrfs(tmp_path, 512 * MiB) as fs:
        m = mounter(url, env=seaweed.env(), cache_dir=fs.mountpoint / "cache", args=["-o", "cache.min_free=0"])
        try:
            load(m, root, "base")
            files = fs.mountpoint / "cache" / "files"
            with_base = btrfs_used(files)
            load(m, root, "ft")
            added = btrfs_used(files) - with_base
            st = m.stats()
            assert st["bytes_fetched"] <= size + changed + 0.02 * size, st  # ft: only what changed
            assert added <= 0.15 * size, (added, size, changed)
            assert passthrough_open(m, "ft") and passthrough_open(m, "base"), m.stats()
        finally:
            m.umount()


def test_a_fine_tune_on_ext4_is_read_from_its_base_until_loaded_often(seaweed: SeaweedServer, tmp_path: Path,
                                                                      mounter: Callable[..., Mount]) -> None:
    """Where files cannot share extents (ext4), a fine-tune's shared tensors are stored once: its loads read
    them from its base's file through the daemon; from its second load on (cache.copy_shared_after) they are
    copied into its own file, inside the kernel, with no GET, and its opens are served by passthrough."""
    root = tmp_path / "src"
    size, changed = fine_tune_pair(root)
    url = publish(seaweed, root, f"ext4-{os.getpid()}")
    m = mounter(url, env=seaweed.env(), args=["-o", "cache.copy_shared_after=2"])
    load(m, root, "base")
    stored = m.stats()["bytes_in_cache"]
    load(m, root, "ft")
    st = m.stats()
    assert st["bytes_in_cache"] - stored <= changed + 0.02 * size, st  # shared tensors stored once
    assert not passthrough_open(m, "ft")  # not whole in its own file: READs through the daemon
    fetched = st["bytes_fetched"]
    time.sleep(LOAD_GAP + 0.5)  # a later load, not the same one opening the file again
    load(m, root, "ft")  # the second load: worth a copy of its own
    st = m.stats()
    assert st["bytes_fetched"] == fetched, st  # copied inside the cache, not fetched
    assert st["bytes_in_cache"] - stored >= size - 0.02 * size, st
    assert passthrough_open(m, "ft"), st
