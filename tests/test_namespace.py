"""Namespace without a mount: hostile keys, dir-wins, versions, lazy TTL listing."""

from __future__ import annotations

import logging

import pytest
import trio

from modelfs.errors import NotFound, StoreError
from modelfs.remote import Listing, ObjectInfo
from modelfs.tree.namespace import Namespace, unsafe_reason


def obj(key: str, etag: str = '"e1"', size: int = 10) -> tuple[str, ObjectInfo]:
    return key.rsplit("/", 1)[-1], ObjectInfo(key, size, etag, 0.0)


class FakeLister:
    """A listing function over a dict prefix -> Listing; counts calls (pure logic, no store)."""

    def __init__(self, listings: dict[str, Listing]) -> None:
        self.listings = listings
        self.calls: list[str] = []
        self.error: Exception | None = None  # raised by every call while set (a failing store)

    async def __call__(self, prefix: str) -> Listing:
        self.calls.append(prefix)
        await trio.sleep(0)
        if self.error is not None:
            raise self.error
        return self.listings.get(prefix, Listing())


@pytest.mark.parametrize(("name", "bad"), [("", True), (".", True), ("..", True), ("a\0b", True),
                                           ("x" * 256, True), ("é" * 127, False), ("é" * 128, True),
                                           ("\udcff", True), (".modelfs", True), ("model.safetensors", False),
                                           ("...", False), (" ", False)])
def test_unsafe_names(name: str, bad: bool) -> None:
    assert (unsafe_reason(name) is not None) == bad


def test_hostile_listing_hides_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    listing = Listing(dirs=["", "..", ".", "ok", "a"], objects=[obj("a"), obj(".."), obj("x" * 300), obj("f")])
    ns = Namespace(FakeLister({"": listing}), ttl=60)

    async def main() -> None:
        with caplog.at_level(logging.WARNING):
            kids = await ns.children(ns.root)
            assert sorted(kids) == ["a", "f", "ok"]
            assert kids["a"].is_dir  # both a file and a prefix: the directory wins
            assert not kids["f"].is_dir
            ns.apply_listing(ns.root, listing)  # a relist must not log the same keys again
        hidden = [r for r in caplog.records if "hidden" in r.getMessage()]
        assert len(hidden) == 5  # dirs "", "..", "."; objects "..", the long name
        assert sum("also a prefix" in r.getMessage() for r in caplog.records) == 1

    trio.run(main)


def test_marker_object_and_nested_empty_segments() -> None:
    lister = FakeLister({"": Listing(dirs=["a"]),
                         "a/": Listing(dirs=[""], objects=[("", ObjectInfo("a/", 0, '"m"', 0)), obj("a/w")])})
    ns = Namespace(lister, ttl=60)

    async def main() -> None:
        a = await ns.lookup(ns.root, "a")
        assert sorted(await ns.children(a)) == ["w"]  # "a//..." and the "a/" marker are not entries
        with pytest.raises(NotFound):
            await ns.lookup(a, "")

    trio.run(main)


def test_ttl_relist_new_etag_is_new_inode_and_unchanged_keeps_inode() -> None:
    now = [0.0]
    lister = FakeLister({"": Listing(objects=[obj("m", '"v1"'), obj("n", '"n1"')])})
    ns = Namespace(lister, ttl=10, clock=lambda: now[0])

    async def main() -> None:
        m1 = await ns.lookup(ns.root, "m")
        ns.remember(m1.inode)  # the kernel holds it (a LOOKUP reply)
        n1 = await ns.lookup(ns.root, "n")
        lister.listings[""] = Listing(objects=[obj("m", '"v2"'), obj("n", '"n1"')])
        now[0] = 5.0
        assert (await ns.lookup(ns.root, "m")) is m1  # within the TTL: cached
        assert lister.calls == [""]
        now[0] = 11.0
        m2 = await ns.lookup(ns.root, "m")
        assert m2.inode != m1.inode and m2.info is not None and m2.info.etag == '"v2"'
        assert (await ns.lookup(ns.root, "n")) is n1
        assert ns.get(m1.inode) is m1  # the old version stays addressable while the kernel holds it
        assert ns.dropped() == []
        ns.forget(m1.inode, 1)
        with pytest.raises(NotFound):
            ns.get(m1.inode)  # replaced, unreferenced, not open: let go
        assert ns.dropped() == [m1.inode] and ns.dropped() == []  # handed to the core once

    trio.run(main)


def test_a_failed_relisting_keeps_the_last_listing() -> None:
    """A name the mount has shown never turns into ENOENT because the store failed a relisting."""
    now = [0.0]
    lister = FakeLister({"": Listing(objects=[obj("m")])})
    ns = Namespace(lister, ttl=10, clock=lambda: now[0])

    async def main() -> None:
        m = await ns.lookup(ns.root, "m")
        lister.error = StoreError("listing failed: 503 from the store", transient=True)
        now[0] = 11.0
        assert (await ns.lookup(ns.root, "m")) is m
        lister.error = None
        assert (await ns.lookup(ns.root, "m")) is m and lister.calls == ["", "", ""]  # asked again each time

    trio.run(main)


def test_concurrent_lookups_list_once() -> None:
    lister = FakeLister({"": Listing(objects=[obj(f"f{i}") for i in range(100)])})
    ns = Namespace(lister, ttl=60)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(ns.lookup, ns.root, f"f{i}")

    trio.run(main)
    assert lister.calls == [""]
