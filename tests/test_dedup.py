"""Publish with manifests, then mount: shared tensors are fetched and stored once across versions.

Real SeaweedFS, real mount, real `modelfs publish`. A base checkpoint and variants: (a) a fine-tune
changing 25 % of the tensors, (b) the base with a longer `__metadata__` header (every offset moves),
(c) the base again under another prefix, and (d) a variant uploaded without a manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs.testing.checkpoints import make_variant_set
from modelfs.testing.seaweed import SeaweedServer
from tests.conftest import BUCKET, Mount, cli, requires_fuse
from tests.conftest import sha256_file as sha

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
