"""The fleet tier: blocks a fleet shares on an S3-compatible store, so it fetches each from the origin about
once. A source of extents (`sources.Source`) that wraps the origin it is built with.

On a local miss the fetcher asks its source, which is this tier when there is one: what the tier holds comes
from it (`fill`), the rest from the origin, cooperatively (`claims`): of nodes that miss an extent at once,
one fetches it and the others wait for it to land here. What came from the origin is written back in the
background (`writeback`), never on a reader's path. A request the tier fails or does not answer within
`shared.deadline` is served by the origin; a tier that answers no request for two deadlines (down,
blackholed) is skipped, like the origin in offline mode, and probed again every `fetch.probe_interval`. So
it never costs a load more than `shared.deadline` per request, and a tier that is only busy (one answer
late, the next on time) keeps serving the extents it answers in time.

Readers trust nothing they read here: the length must be the extent's, and the hash must be the one the
reader expects (the manifest's, for a content key) or, for a version key, the one in its metadata, which
catches damage but not a writer who lies (SECURITY.md). A mismatch is counted and the origin is used.
Layout and keys: `layout`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import trio
import xxhash

from modelfs.config import Config
from modelfs.digest import content_hash
from modelfs.errors import ModelfsError
from modelfs.health import Health
from modelfs.remote import ObjectInfo, WritableStore
from modelfs.remote.local import LocalStore
from modelfs.remote.s3 import S3Store, parse_s3_url
from modelfs.remote.sources import Arrived, Block, Landed, Source
from modelfs.shared.claims import Claims
from modelfs.shared.layout import block_key, node_id
from modelfs.shared.writeback import WRITERS, ReadBack, WriteBack, WriteBacks
from modelfs.stats import Stats
from modelfs.supervise import Supervisor

log = logging.getLogger(__name__)

#: What the tier answered a read (`SharedTier._read`).
Answer = Literal["hit", "miss", "damaged", "failed"]

#: A tier that answers no request for this many `shared.deadline`s is skipped until a probe gets an answer.
OFFLINE_AFTER = 2


class SharedTier:
    """The fleet tier of one daemon, in front of `origin`: reads, claims and waits from fetch worker threads;
    write-backs from its own supervised tasks."""

    def __init__(self, store: WritableStore, domain: str, stats: Stats, read_back: ReadBack, origin: Source, *,
                 deadline: float, probe_interval: float, write_back: bool = True, trust: str = "all",
                 node: str = "", flight_deadline: float = 30.0, writer: WritableStore | None = None,
                 supervisor: Supervisor, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.origin = origin
        self.domain = domain
        self.stats = stats
        self.supervisor = supervisor  # runs its writers, probe and claim watch: the daemon's, as every part's
        self.deadline = deadline
        self.writes = write_back
        self.manifest_only = trust == "manifest"
        self.node = node
        # A request past its deadline makes the tier suspect, not skipped: a tier that is busy (its server
        # short of CPU while a fleet writes to it) misses one deadline and answers the next request, and
        # skipping it then would send every extent to the origin for a probe interval. One that answers
        # nothing for `offline_after` (down, blackholed) is skipped; each request costs at most `deadline`.
        self.health = Health(store.check, f"shared cache tier {store.describe()}", probe_interval, deadline,
                             mode="skipped, loads go to the origin", offline_after=OFFLINE_AFTER * deadline)
        self.claims = Claims(store, stats, node, deadline=deadline, flight_deadline=flight_deadline,
                             answered=self.health.answered, unanswered=self._unanswered, clock=clock)
        # Writes send a whole block before the answer comes: they get the origin's timeouts, not the
        # per-request deadline of reads (a write-back is never on a reader's path).
        self.writebacks = WriteBacks(writer or store, stats, self.health, read_back, deadline=deadline,
                                     drop_claim=self.claims.drop)
        self._corrupt_logged = False

    @classmethod
    def open(cls, cfg: Config, domain: str, stats: Stats, read_back: ReadBack, origin: Source,
             supervisor: Supervisor) -> SharedTier:
        """The tier `cfg.shared` describes, in front of `origin` (its store reached lazily: a tier that is down
        at mount is just skipped). One attempt per request, timeouts of `shared.deadline`: a failing tier is
        skipped, not retried. An s3:// URL, or a directory every node mounts (file:///DIR)."""
        reader: WritableStore
        writer: WritableStore
        if cfg.shared.url.startswith("s3://"):
            bucket, prefix = parse_s3_url(cfg.shared.url)
            endpoint = cfg.shared.endpoint_url or cfg.s3.endpoint_url
            reader = S3Store(bucket, prefix, dataclasses.replace(
                cfg.s3, endpoint_url=endpoint, max_attempts=1, connect_timeout=cfg.shared.deadline,
                read_timeout=cfg.shared.deadline))
            writer = S3Store(bucket, prefix, dataclasses.replace(cfg.s3, endpoint_url=endpoint, max_attempts=1),
                             sign_payload=False)
        else:
            reader = writer = LocalStore(cfg.shared.url.removeprefix("file://"))
        return cls(reader, domain, stats, read_back, origin, deadline=cfg.shared.deadline,
                   probe_interval=cfg.fetch.probe_interval, write_back=cfg.shared.write_back,
                   trust=cfg.shared.trust, node=node_id(cfg), flight_deadline=cfg.fetch.deadline, writer=writer,
                   supervisor=supervisor)

    def start(self) -> None:
        """Start the writers, the probe and the claim watch (the supervisor's nursery must be running)."""
        self.claims.token = self.writebacks.token = trio.lowlevel.current_trio_token()
        supervisor = self.supervisor
        supervisor.spawn(self.health.probe_loop, name="shared tier probe", restart=True)
        supervisor.spawn(self.claims.watch, name="shared tier claim watch", restart=True)
        for i in range(WRITERS):
            supervisor.spawn(self.writebacks.drain, name=f"shared tier writer {i}", restart=True)

    def key(self, block: Block) -> str | None:
        """Where an extent lives in the tier; None if it may not be read from or written to it (trust)."""
        return block_key(self.domain, block, self.manifest_only)

    def rotation(self, seed: str, n: int) -> int:
        """Where this node starts prefetching `n` things named by `seed` (the extents of a file version, the
        shards of a checkpoint): nodes that load one new checkpoint at once each start elsewhere, so they
        fetch different extents from the origin and share them here."""
        return xxhash.xxh3_64_intdigest(f"{self.node}\0{seed}".encode()) % n if n else 0

    def _unanswered(self, e: BaseException) -> None:
        """A read-side request (read, claim, HEAD, claim listing) got no answer: counted, and the tier is
        suspect (skipped if it answers nothing for `offline_after`)."""
        self.stats.add(shared_errors=1)
        self.health.mark_unreachable(e)

    # -- reads (fetch worker threads) -------------------------------------------------------------------

    def fetch(self, block: Block, view: memoryview) -> bytes | None:
        """Fill `view` with the extent from the tier; its verified hash, or None (not there, not trusted, tier
        skipped or failing, or bytes that do not check out: the origin then serves)."""
        return self._read(block, view)[1]

    def _read(self, block: Block, view: memoryview) -> tuple[Answer, bytes | None]:
        """("hit", hash) for verified bytes; otherwise (what the tier answered, None): "miss" (counted),
        "damaged" (bytes that do not check out: the object is to be replaced), or "failed" (failed, too
        slow, or not asked: nothing more to expect from it for this extent)."""
        key = self.key(block)
        if key is None or self.health.offline:
            return "failed", None
        try:
            meta = self.store.get_into(key, [view], deadline=time.monotonic() + self.deadline)
        except (ModelfsError, OSError) as e:
            self._unanswered(e)
            return "failed", None
        self.health.answered()
        if meta is None:
            self.stats.add(shared_misses=1)
            return "miss", None
        digest = content_hash(view)
        want = block.digest if block.digest is not None else _hex(meta.get("xxh3", ""))
        if digest != want:
            self.stats.add(shared_corrupt=1)
            if not self._corrupt_logged:
                self._corrupt_logged = True
                log.warning("shared cache tier: %s does not match its hash: ignored, the origin serves it", key)
            return "damaged", None
        self.stats.add(shared_hits=1, shared_bytes_read=len(view))
        return "hit", digest

    # -- the source: cooperative fetch (fetch worker threads) ---------------------------------------------

    def fill(self, info: ObjectInfo, blocks: Sequence[Block], views: Sequence[memoryview], arrived: Arrived,
             until: float) -> None:
        """Fill the extents of `blocks` as a fleet. What the tier holds comes from it; of the rest, this node
        GETs from the origin what it claimed or nobody could claim, and only then waits for the extents other
        nodes claimed, so its own GET is never held up by theirs. Each extent is handed to `arrived`; what
        came from the origin then goes to the tier in the background, a claimed extent before any other
        (other nodes wait for it): never on this node's readers' path."""
        claimed: set[int] = set()  # extents this node fetches from the origin for the fleet
        waiting: list[int] = []  # extents another node is fetching from the origin now
        done: set[int] = set()

        def from_origin(todo: list[int]) -> None:
            def landed(k: int, _: bytes | None) -> Landed:
                i = todo[k]
                stored = arrived(i, None)
                done.add(i)
                if i in claimed:
                    claimed.discard(i)
                    if stored.cached:
                        self.share_soon(blocks[i], stored.digest)
                    else:
                        self.release(blocks[i])
                elif stored.cached:
                    self.write_back(blocks[i], stored.digest)
                return stored
            if todo:
                self.origin.fill(info, [blocks[i] for i in todo], [views[i] for i in todo], landed, until)

        try:
            for i, (block, view) in enumerate(zip(blocks, views, strict=True)):
                answer, digest = self._read(block, view)
                key = self.key(block)
                if key is not None and (answer == "miss" or answer == "damaged"):
                    mine = self._claim(key)
                    # Shared between this node's miss and its claim (a busy tier takes seconds to claim):
                    # read it, instead of a GET from the origin and a PUT.
                    if mine and answer == "miss" and self.claims.landed(key):
                        self.claims.drop(key)
                        answer, digest = self._read(block, view)
                    elif mine is False:
                        waiting.append(i)
                    elif mine:
                        claimed.add(i)
                # else the tier failed this extent: the origin serves it, unclaimed (a claim would cost the
                # loader another deadline)
                if digest is not None:
                    arrived(i, digest)
                    done.add(i)
            from_origin([i for i in range(len(blocks)) if i not in done and i not in waiting])
            for i in waiting:  # then what other nodes are fetching: it may be in the tier by now
                digest = self.wait_for(blocks[i], views[i], until - self.deadline)
                if digest is not None:
                    arrived(i, digest)
                else:
                    from_origin([i])
        finally:
            for i in claimed:  # left only if the fetch failed: nobody should wait for it any longer
                self.release(blocks[i])

    def claim(self, block: Block) -> bool | None:
        """After a miss: True if this node is to fetch the extent from the origin and share it at once
        (`share_soon`); False if another node is fetching it now (`wait_for` it); None if the tier cannot
        say (fetch it, and share it in the background as usual)."""
        key = self.key(block)
        return None if key is None else self._claim(key)

    def _claim(self, key: str) -> bool | None:
        if not self.writes or self.health.offline:
            return None
        try:
            return self.claims.claim(key)
        except (ModelfsError, OSError) as e:
            self._unanswered(e)
            return None

    def wait_for(self, block: Block, view: memoryview, until: float = float("inf")) -> bytes | None:
        """The extent another node claimed, once it lands in the tier (verified hash); None if it did not land
        in time (`claims.Claims.wait`: then this node fetches it from the origin)."""
        key = self.key(block)
        if key is None or not self.claims.wait(key, until):
            return None
        return self._read(block, view)[1]  # a miss: the claimer's fetch or write failed

    def release(self, block: Block) -> None:
        """Drop this node's claim (the fetch failed: others need not wait any longer)."""
        key = self.key(block)
        if key is not None:
            self.claims.drop(key)

    # -- write-back --------------------------------------------------------------------------------------

    def share_soon(self, block: Block, digest: bytes) -> None:
        """From a fetch worker thread: an extent this node claimed was fetched and stored (its readers are
        answered): write it to the tier before any other write-back (other nodes are waiting for it), then
        drop the claim."""
        key = self.key(block)
        if key is not None:
            self.writebacks.submit(WriteBack(key, block.vid, block.start, digest, block.length, claimed=True))

    def write_back(self, block: Block, digest: bytes) -> None:
        """From a fetch worker thread: queue an extent just fetched from the origin (and stored in the local
        cache) for the tier. Never waits: a full queue drops it (counted)."""
        key = self.key(block)
        if self.writes and key is not None:
            self.writebacks.submit(WriteBack(key, block.vid, block.start, digest, block.length))

    async def warm(self, blocks: Sequence[tuple[Block, bytes]]) -> None:
        """Make sure the tier holds these extents (each with its hash) of a version the local cache holds
        (`modelfs prefetch` warms the fleet): each is written unless the tier has it already."""
        items = [WriteBack(key, block.vid, block.start, digest, block.length)
                 for block, digest in blocks if (key := self.key(block)) is not None]
        await self.writebacks.warm(items)

    async def flush(self, timeout: float) -> int:
        """At unmount: the write-backs queued, given up to `timeout` seconds (`writeback.WriteBacks.flush`)."""
        return await self.writebacks.flush(timeout)

    @property
    def pending(self) -> int:
        return self.writebacks.pending

    def close(self) -> None:
        self.store.close()
        if self.writebacks.writer is not self.store:
            self.writebacks.writer.close()


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""
