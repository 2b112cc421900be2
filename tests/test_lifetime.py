"""Inode lifetime: what the daemon holds follows what the kernel and the store show, not every ETag ever seen."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from modelfs.core import ModelFS
from tests.conftest import Mount, requires_fuse
from tests.test_prefetch import lookup, make_core, run


def rewrite(path: Path, i: int) -> bytes:
    """A new version of the file: a new inode (so a new ETag), as an overwritten object would have."""
    data = f"version {i} ".encode() * (1 + i % 7)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def test_relisting_1000_etag_changes_keeps_the_inode_table_bounded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    notes = src / "notes.txt"
    rewrite(notes, 0)
    core, close = make_core(src, tmp_path / "cache", **{"mount.metadata_ttl": "0"})
    held = {"inodes": 0, "versions": 0}

    async def body(core: ModelFS) -> None:
        old_fh = None
        for i in range(1, 1001):
            data = rewrite(notes, i)
            node = await core.lookup(1, "notes.txt")  # relisted: the new ETag is a new inode
            core.remember(node)  # as fs.lookup does when it answers the kernel
            fh = core.open(node.inode, os.O_RDONLY)
            assert bytes(await core.read(fh, 0, 1 << 20)) == data
            if i == 10:
                old_fh, old_data = fh, data  # one handle stays open on an old version
            else:
                core.release(fh)
            core.forget(node.inode, 1)  # the kernel evicts the inode: FUSE FORGET
            held["inodes"] = max(held["inodes"], len(core.ns))
            held["versions"] = max(held["versions"], len(core.files))
        assert old_fh is not None
        assert bytes(await core.read(old_fh, 0, 1 << 20)) == old_data  # still serves its own version
        before = len(core.ns)
        core.release(old_fh)
        assert len(core.ns) == before - 1  # closed, unlisted, forgotten: dropped
        assert len(core.files) <= 1

    try:
        run(core, body)
    finally:
        close()
    # root + the current version, + the old version held open, + the one replaced this very iteration
    assert held["inodes"] <= 4, held
    assert held["versions"] <= 3, held


def test_inodes_the_kernel_still_holds_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    notes = src / "notes.txt"
    rewrite(notes, 0)
    core, close = make_core(src, tmp_path / "cache", **{"mount.metadata_ttl": "0"})

    async def body(core: ModelFS) -> None:
        first = await core.lookup(1, "notes.txt")
        core.remember(first)
        rewrite(notes, 1)
        second = await core.lookup(1, "notes.txt")
        assert second.inode != first.inode
        assert core.node(first.inode) is first  # the kernel may still getattr/open it
        core.forget(first.inode, 1)
        assert first.inode not in {n.inode for n in (core.ns.root, second)}
        try:
            core.node(first.inode)
        except Exception as e:
            assert "stale inode" in str(e)
        else:
            raise AssertionError("a forgotten, unlisted inode was kept")
        assert await lookup(core, "notes.txt") == second.inode

    try:
        run(core, body)
    finally:
        close()


@requires_fuse
def test_forget_through_a_mount_lets_old_versions_go(tmp_path: Path, mounter: Callable[..., Mount]) -> None:
    """Through a real mount: 100 overwrites, each looked up and read: as the kernel sends FORGET for the
    replaced inodes (and for the rest after drop_caches), the daemon holds a handful, not 100 versions."""
    src = tmp_path / "src"
    src.mkdir()
    notes = src / "notes.txt"
    rewrite(notes, 0)
    m = mounter(str(src), args=["-o", "mount.metadata_ttl=0"])
    most = 0
    for i in range(1, 101):
        data = rewrite(notes, i)
        assert (m.path / "notes.txt").read_bytes() == data
        most = max(most, m.stats()["inodes"])
    assert most <= 4, most  # the kernel forgets a replaced inode promptly; the daemon lets it go
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # evict dentries and inodes: the kernel sends FORGET for each
    deadline = time.monotonic() + 20
    while m.stats()["inodes"] > 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    st = m.stats()
    assert st["inodes"] <= 3 and st["versions_held"] <= 1, st
