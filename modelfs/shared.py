"""The shared cache tier: blocks a fleet shares on an S3-compatible store, so it fetches each from the origin
about once.

On a local miss the fetcher asks this tier before the origin (`SharedTier.fetch`, from its worker thread);
what came from the origin is written back here in the background (`SharedTier.write_back`: a bounded queue
drained by supervised tasks; never on a reader's path). A request the tier fails or does not answer within
`shared.deadline` is served by the origin; a tier that answers no request for two deadlines (down,
blackholed) is skipped, like the origin in offline mode, and probed again every `fetch.probe_interval`. So
it never costs a load more than `shared.deadline` per request, and a tier that is only busy (one answer
late, the next on time) keeps serving the extents it answers in time.

Layout, under the prefix of `shared.url` (version 1):

    v1/<domain>/<h>                   an extent whose xxh3-128 content hash is <h> (32 hex digits)
    v1/<domain>/ver/<vid>/<offset>    the extent at byte <offset> of file version <vid> (hex version id:
                                      key + ETag + size, `index.version_id`), for files whose extents'
                                      hashes readers cannot know in advance (no published manifest);
                                      user metadata `xxh3` = the hex hash of its bytes

    v1/claims/<domain>/...            a claim: the node named in its body is fetching that extent from
                                      the origin now (cooperative fetch); deleted once the extent is
                                      shared, ignored once older than a flight can last

<domain> is the xxh3-64 of the origin's trust domain (one bucket by default), as in the local cache:
content is shared by hash only within one trust domain.

Invariants:
- A key's bytes never change. A content key holds exactly the bytes that hash to its name; a version key
  holds the bytes of an immutable version at that offset. So nothing is ever invalidated, and any object
  may vanish at any time (the bucket's lifecycle rules are its eviction): a vanished object is a miss.
- Writers PUT whole objects; S3 makes a PUT visible whole or not at all. A crash mid-PUT leaves nothing.
- Readers trust nothing they read here: the length must be the extent's, and the hash must be the one the
  reader expects (the manifest's, for a content key) or, for a version key, the one in its metadata, which
  catches damage but not a writer who lies (SECURITY.md). A mismatch is counted and the origin is used.
- A claim is made with a conditional PUT (If-None-Match: *): of nodes that miss one extent at once,
  exactly one fetches it from the origin and writes it here before any other write-back (after answering
  its own readers: its loads never wait for the tier), then deletes the claim; the others poll the claim
  listing until the claim is gone, for a bounded time, then read it here or fetch it themselves. A node
  whose claim wins first checks that the extent is not here already: another node may have written it
  and deleted its claim between this node's miss and its claim; then it deletes its claim and reads it. A
  crash before the write leaves the claim: the others wait out the bound, then fetch it themselves. A
  claim left by a node that died is taken over once older than any flight may run (by the store's
  clock, not a node's).
- Which key an extent goes under depends only on its file version: manifest versions use content keys
  (their readers know every hash), other versions use version keys. Every node picks the same one.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import trio
import xxhash

from modelfs.cache import content_hash
from modelfs.config import Config
from modelfs.errors import ModelfsError, NotFound, StoreError, StoreUnreachable
from modelfs.health import Health
from modelfs.remote import Listing, WritableStore
from modelfs.remote.local import LocalStore
from modelfs.remote.s3 import S3Store, parse_s3_url
from modelfs.stats import Stats
from modelfs.supervise import Supervisor
from modelfs.version import FileVersion, Stored

log = logging.getLogger(__name__)

#: What the tier answered a read (`SharedTier._read`).
Answer = Literal["hit", "miss", "damaged", "failed"]

LAYOUT = "v1"
#: Write-backs waiting for a writer; more are dropped (and counted), never waited for.
QUEUE = 256
WRITERS = 4
#: A tier that answers no request for this many `shared.deadline`s is skipped until a probe gets an answer.
OFFLINE_AFTER = 2
#: How often a node waiting for extents other nodes claimed lists their claims (one LIST per directory).
CLAIM_POLL = 0.05


def domain_dir(domain: str) -> str:
    return xxhash.xxh3_64_hexdigest(domain.encode())


def content_key(domain: str, digest: bytes) -> str:
    return f"{LAYOUT}/{domain_dir(domain)}/{digest.hex()}"


def version_key(domain: str, vid: bytes, offset: int) -> str:
    return f"{LAYOUT}/{domain_dir(domain)}/ver/{vid.hex()}/{offset}"


def claim_key(key: str) -> str:
    return f"{LAYOUT}/claims/{key.removeprefix(LAYOUT + '/')}"


def node_id(cfg: Config) -> str:
    """This node's name in cooperative fetch: `shared.node_id`, else hostname and cache dir (two daemons
    on one host are two nodes)."""
    return cfg.shared.node_id or f"{socket.gethostname()}:{os.path.abspath(cfg.cache.dir)}"


#: Reads an extent back from the local cache for a write-back: (vid, start, length, hash) -> its bytes, checked
#: against the hash, or None if the cache no longer holds them (`extents.Blocks.read_back`).
ReadBack = Callable[[bytes, int, int, bytes], "memoryview | None"]


@dataclasses.dataclass(frozen=True)
class _WriteBack:
    key: str
    vid: bytes  # the extent is read back from this version's cache file, at `start`
    start: int
    digest: bytes
    length: int
    claim: str | None = None  # this node's claim on the extent, dropped once it is written (or failed)


class SharedTier:
    """The shared tier of one daemon: reads from fetch worker threads, write-backs from its own tasks."""

    def __init__(self, store: WritableStore, domain: str, stats: Stats, read_back: ReadBack, *, deadline: float,
                 probe_interval: float, write_back: bool = True, trust: str = "all", node: str = "",
                 flight_deadline: float = 30.0, writer: WritableStore | None = None,
                 supervisor: Supervisor) -> None:
        self.store = store
        # Writes send a whole block before the answer comes: they get the origin's timeouts, not the
        # per-request deadline of reads (a write-back is never on a reader's path).
        self.writer = writer or store
        self.domain = domain
        self.stats = stats
        self.supervisor = supervisor  # runs its writers, probe and claim watch: the daemon's, as every part's
        self.read_back = read_back
        self.deadline = deadline
        self.writes = write_back
        self.manifest_only = trust == "manifest"
        self.node = node
        # A peer's claimed extent normally lands within a GET and a PUT; past this with no claim landing
        # anywhere in the directories waited on, fetch it here. While claims keep landing (the fleet is
        # writing, only behind: a busy tier, a long queue of claimed writes), wait on, up to a flight's
        # deadline: a node that died stops every claim of its own, not the others'.
        self.wait = 4 * deadline
        self.wait_most = max(self.wait, flight_deadline)
        self.stale_after = flight_deadline + self.wait
        self._progress = 0.0  # time.monotonic() when a claim last vanished from a listing (trio thread writes)
        # A request past its deadline makes the tier suspect, not skipped: a tier that is busy (its server
        # short of CPU while a fleet writes to it) misses one deadline and answers the next request, and
        # skipping it then would send every extent to the origin for a probe interval. One that answers
        # nothing for `offline_after` (down, blackholed) is skipped; each request costs at most `deadline`.
        self.health = Health(store.check, f"shared cache tier {store.describe()}", probe_interval, deadline,
                             mode="skipped, loads go to the origin", offline_after=OFFLINE_AFTER * deadline)
        # Two lanes: extents this node claimed (other nodes wait for them) are written before any other.
        self._claimed: collections.deque[_WriteBack] = collections.deque()
        self._queued: collections.deque[_WriteBack] = collections.deque()
        self._wake = trio.lowlevel.ParkingLot()
        self._writing = 0
        # Fetch threads waiting for extents other nodes claimed: claim key -> one event per waiter.
        self._waiters: dict[str, list[threading.Event]] = {}
        self._waiters_lock = threading.Lock()
        self._watch_wake = trio.lowlevel.ParkingLot()
        self._limiter = trio.CapacityLimiter(WRITERS)
        self._token: trio.lowlevel.TrioToken | None = None
        self._corrupt_logged = False

    @classmethod
    def open(cls, cfg: Config, domain: str, stats: Stats, read_back: ReadBack, supervisor: Supervisor) -> SharedTier:
        """The tier `cfg.shared` describes (its store reached lazily: a tier that is down at mount is just
        skipped). One attempt per request, timeouts of `shared.deadline`: a failing tier is skipped, not
        retried. An s3:// URL, or a directory every node mounts (file:///DIR)."""
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
        return cls(reader, domain, stats, read_back, deadline=cfg.shared.deadline,
                   probe_interval=cfg.fetch.probe_interval, write_back=cfg.shared.write_back,
                   trust=cfg.shared.trust, node=node_id(cfg), flight_deadline=cfg.fetch.deadline, writer=writer,
                   supervisor=supervisor)

    def start(self) -> None:
        """Start the writers, the probe and the claim watch (the supervisor's nursery must be running)."""
        self._token = trio.lowlevel.current_trio_token()
        supervisor = self.supervisor
        supervisor.spawn(self.health.probe_loop, name="shared tier probe", restart=True)
        supervisor.spawn(self._watch_claims, name="shared tier claim watch", restart=True)
        for i in range(WRITERS):
            supervisor.spawn(self._writer, name=f"shared tier writer {i}", restart=True)

    def key(self, ver: FileVersion, start: int) -> str | None:
        """Where an extent lives in the tier; None if it may not be read from or written to it (trust)."""
        if ver.layout is not None:
            return content_key(self.domain, ver.known[start][0])
        return None if self.manifest_only else version_key(self.domain, ver.vid, start)

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

    def fetch(self, ver: FileVersion, start: int, view: memoryview) -> bytes | None:
        """Fill `view` with the extent at `start` from the tier; its verified hash, or None (not there,
        not trusted, tier skipped or failing, or bytes that do not check out: the origin then serves)."""
        return self._read(ver, start, view)[1]

    def _read(self, ver: FileVersion, start: int, view: memoryview) -> tuple[Answer, bytes | None]:
        """("hit", hash) for verified bytes; otherwise (what the tier answered, None): "miss" (counted),
        "damaged" (bytes that do not check out: the object is to be replaced), or "failed" (failed, too
        slow, or not asked: nothing more to expect from it for this extent)."""
        key = self.key(ver, start)
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
        want = ver.known[start][0] if ver.layout is not None else _hex(meta.get("xxh3", ""))
        if digest != want:
            self.stats.add(shared_corrupt=1)
            if not self._corrupt_logged:
                self._corrupt_logged = True
                log.warning("shared cache tier: %s does not match its hash: ignored, the origin serves it", key)
            return "damaged", None
        self.stats.add(shared_hits=1, shared_bytes_read=len(view))
        return "hit", digest

    # -- cooperative fetch (fetch worker threads) ----------------------------------------------------------

    def cooperate(self, ver: FileVersion, run: list[tuple[int, int]], views: list[memoryview],
                  origin: Callable[[list[int], Callable[[int], object]], None],
                  arrived: Callable[[int, bytes | None], Stored], until: float = float("inf")) -> None:
        """From a fetch worker thread: fill the extents of `run` (into `views`) as a fleet. What the tier
        holds comes from it; of the rest, this node GETs from the origin (`origin(indexes, each)`, which
        calls `each(i)` as extent i is in) what it claimed or nobody could claim, and only then waits for
        the extents other nodes claimed, so its own GET is never held up by theirs. Each extent is handed
        to `arrived(i, hash or None)` (the fetcher stores it and answers its readers); what came from the
        origin then goes to the tier in the background, a claimed extent before any other (other nodes
        wait for it): never on this node's readers' path."""
        claimed: set[int] = set()  # extents this node fetches from the origin for the fleet
        waiting: list[int] = []  # extents another node is fetching from the origin now
        done: set[int] = set()

        def from_origin(i: int) -> None:
            start, length = run[i]
            stored = arrived(i, None)
            done.add(i)
            if i in claimed:
                claimed.discard(i)
                if stored.cached:
                    self.share_soon(ver, start, stored.digest, length)
                else:
                    self.release(ver, start)
            elif stored.cached:
                self.write_back(ver, start, stored.digest, length)

        try:
            for i, ((start, _), view) in enumerate(zip(run, views, strict=True)):
                answer, digest = self._read(ver, start, view)
                if answer == "miss" or answer == "damaged":
                    mine = self.claim(ver, start)
                    # Shared between this node's miss and its claim (a busy tier takes seconds to claim):
                    # read it, instead of a GET from the origin and a PUT.
                    if mine and answer == "miss" and self._landed(ver, start):
                        self.release(ver, start)
                        answer, digest = self._read(ver, start, view)
                    elif mine is False:
                        waiting.append(i)
                    elif mine:
                        claimed.add(i)
                # else the tier failed this extent: the origin serves it, unclaimed (a claim would cost the
                # loader another deadline)
                if digest is not None:
                    arrived(i, digest)
                    done.add(i)
            origin([i for i in range(len(run)) if i not in done and i not in waiting], from_origin)
            for i in waiting:  # then what other nodes are fetching: it may be in the tier by now
                digest = self.wait_for(ver, run[i][0], views[i], until - self.deadline)
                if digest is not None:
                    arrived(i, digest)
                else:
                    origin([i], from_origin)
        finally:
            for i in claimed:  # left only if the fetch failed: nobody should wait for it any longer
                self.release(ver, run[i][0])

    def claim(self, ver: FileVersion, start: int) -> bool | None:
        """After a miss: True if this node is to fetch the extent from the origin and share it at once
        (`share_now`); False if another node is fetching it now (`wait_for` it); None if the tier cannot
        say (fetch it, and share it in the background as usual)."""
        key = self.key(ver, start)
        if key is None or not self.writes or self.health.offline:
            return None
        ckey = claim_key(key)
        try:
            if self.store.put(ckey, self.node.encode(), {}, if_absent=True):
                self.health.answered()
                return True
            age = self.store.age(ckey)
            self.health.answered()
            if age is None or age > self.stale_after:  # shared meanwhile, or its node died: ours now
                self.store.put(ckey, self.node.encode(), {})
                return True
            return False
        except (ModelfsError, OSError) as e:
            self._unanswered(e)
            return None

    def _landed(self, ver: FileVersion, start: int) -> bool:
        """After this node won a claim: whether the extent is in the tier after all. Another node may have
        written it and dropped its claim between this node's miss and its claim (seconds, on a busy tier);
        one HEAD then saves a GET from the origin and a PUT."""
        key = self.key(ver, start)
        try:
            return key is not None and self.store.exists(key)
        except (ModelfsError, OSError) as e:
            self._unanswered(e)
            return False

    def wait_for(self, ver: FileVersion, start: int, view: memoryview,
                 until: float = float("inf")) -> bytes | None:
        """The extent another node claimed, once it lands in the tier (verified hash), waiting `wait` seconds
        past the last claim seen to land (`wait_most` at most); None if it did not (then this node fetches
        it from the origin).

        The claimer deletes its claim once the extent is written (or its fetch failed), so the waiter
        sleeps until its claim is gone from the claim listing, which one task of this daemon polls for all
        of its waiters at once (`_watch_claims`): the tier sees one LIST per claimed directory per
        `CLAIM_POLL`, however many extents this node waits for; then one GET."""
        key = self.key(ver, start)
        if key is None or self._token is None:
            return None
        self.stats.add(shared_waits=1)
        gone = threading.Event()
        ckey = claim_key(key)
        with self._waiters_lock:
            self._waiters.setdefault(ckey, []).append(gone)
        try:
            self._token.run_sync_soon(self._watch_wake.unpark_all)
            if not self._until_landed(gone, until):
                self.stats.add(shared_misses=1, shared_wait_expired=1)
                return None
        except trio.RunFinishedError:
            return None
        finally:
            with self._waiters_lock:  # timed out (a woken waiter is already forgotten)
                events = self._waiters.get(ckey, [])
                if gone in events:
                    events.remove(gone)
                    if not events:
                        del self._waiters[ckey]
        return self._read(ver, start, view)[1]  # a miss: the claimer's fetch or write failed

    def _until_landed(self, gone: threading.Event, most: float = float("inf")) -> bool:
        """Wait for `gone`: at most `wait` seconds past the later of now and the last claim seen to land,
        `wait_most` in all, and never past `most` (time.monotonic(): the flight's deadline, less the time
        its own GET of the extent needs). False if it ran out."""
        began = time.monotonic()
        while True:
            until = min(most, began + self.wait_most, max(began, self._progress) + self.wait)
            left = until - time.monotonic()
            if left <= 0:
                return gone.is_set()
            if gone.wait(left):
                return True

    async def _watch_claims(self) -> None:
        """While any fetch thread waits for an extent another node claimed: list the directories of those
        claims every CLAIM_POLL and wake the waiters whose claim is gone. A failed listing wakes them all
        (they fetch from the origin: a tier that cannot list is not one to wait for). Any claim listed
        before and gone now, this node's waiters' or not, is progress: the fleet's claimed writes land."""
        listed: dict[str, set[str]] = {}
        while True:
            with self._waiters_lock:
                waited = list(self._waiters)
            if not waited:
                listed.clear()
                await self._watch_wake.park()
                continue
            dirs: dict[str, list[str]] = {}
            for ckey in waited:
                parent, _, name = ckey.rpartition("/")
                dirs.setdefault(parent + "/", []).append(name)
            gone: list[str] = []
            for parent, names in dirs.items():
                try:
                    listing = await trio.to_thread.run_sync(self.store.list_dir, parent, abandon_on_cancel=True)
                except NotFound:  # a directory store lists no claims as no directory
                    listing = Listing()
                except (ModelfsError, OSError) as e:
                    self._unanswered(e)
                    gone += [parent + n for n in names]
                    continue
                self.health.answered()
                present = {n for n, _ in listing.objects}
                gone += [parent + n for n in names if n not in present]
                if listed.get(parent, set()) - present:
                    self._progress = time.monotonic()
                listed[parent] = present
            self.stats.add(shared_polls=1)
            with self._waiters_lock:
                for ckey in gone:  # woken: not listed again for them
                    for event in self._waiters.pop(ckey, ()):
                        event.set()
            await trio.sleep(CLAIM_POLL)

    def share_soon(self, ver: FileVersion, start: int, digest: bytes, length: int) -> None:
        """From a fetch worker thread: an extent this node claimed was fetched and stored (its readers are
        answered): write it to the tier before any other write-back (other nodes are waiting for it), then
        drop the claim."""
        key = self.key(ver, start)
        if key is not None:
            self._submit(_WriteBack(key, ver.vid, start, digest, length, claim_key(key)))

    def release(self, ver: FileVersion, start: int) -> None:
        """Drop this node's claim (the fetch failed: others need not wait any longer)."""
        key = self.key(ver, start)
        if key is not None:
            self._drop_claim(claim_key(key))

    def _drop_claim(self, ckey: str) -> None:
        try:
            self.store.delete(ckey)
        except (ModelfsError, OSError) as e:
            log.debug("shared cache tier: claim %s not dropped: %s", ckey, e)

    # -- write-back ------------------------------------------------------------------------------------

    def write_back(self, ver: FileVersion, start: int, digest: bytes, length: int) -> None:
        """From a fetch worker thread: queue an extent just fetched from the origin (and stored in the local
        cache) for the tier. Never waits: a full queue drops it (counted)."""
        key = self.key(ver, start)
        if self.writes and key is not None:
            self._submit(_WriteBack(key, ver.vid, start, digest, length))

    def _submit(self, item: _WriteBack) -> None:
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(self._enqueue, item)
        except trio.RunFinishedError:
            pass

    async def fill(self, ver: FileVersion, extents: Sequence[tuple[int, int]]) -> None:
        """Make sure the tier holds these extents of a version the local cache holds (`modelfs prefetch`
        warms the fleet): each is written unless the tier has it already."""
        for start, length in extents:
            key = self.key(ver, start)
            known = ver.known.get(start)
            if key is None or known is None or self.health.offline:
                continue
            await trio.to_thread.run_sync(self._put, _WriteBack(key, ver.vid, start, known[0], length), True,
                                          limiter=self._limiter, abandon_on_cancel=True)

    def _enqueue(self, item: _WriteBack) -> None:
        if item.claim is not None:
            self._claimed.append(item)  # bounded by this node's flights
        elif len(self._queued) < QUEUE:
            self._queued.append(item)
        else:
            self.stats.add(shared_writeback_dropped=1)
            return
        self._wake.unpark()

    async def _writer(self) -> None:
        while True:
            while not self._claimed and not self._queued:
                await self._wake.park()
            item = self._claimed.popleft() if self._claimed else self._queued.popleft()
            self._writing += 1
            try:
                await trio.to_thread.run_sync(self._write, item, limiter=self._limiter, abandon_on_cancel=True)
            finally:
                self._writing -= 1

    async def flush(self, timeout: float) -> int:
        """At unmount (the mount no longer serves): let the writers finish the write-backs queued, claimed ones
        first, for up to `timeout` seconds, so a node that unmounts right after a load still leaves the fleet
        what it fetched; then drop the rest, and the claims among them (nobody waits for those any longer).
        Returns how many were dropped."""
        with trio.move_on_after(timeout):
            while self.pending:
                await trio.sleep(0.02)
        left = [*self._claimed, *self._queued]
        self._claimed.clear()
        self._queued.clear()
        if left:
            self.stats.add(shared_writeback_dropped=len(left))
            claims = [item.claim for item in left if item.claim is not None]
            with trio.move_on_after(2 * self.deadline):
                for ckey in claims:
                    await trio.to_thread.run_sync(self._drop_claim, ckey, abandon_on_cancel=True)
        return len(left)

    @property
    def pending(self) -> int:
        """Write-backs queued or being written (trio thread)."""
        return len(self._claimed) + len(self._queued) + self._writing

    def _write(self, item: _WriteBack) -> None:
        """One write-back (skipped while the tier is offline), then the claim it ends, if any: a claim is
        dropped even when the write was not made, so nobody waits for it any longer."""
        if not self.health.offline:
            # An extent nobody claimed came from the origin after a miss, a failed claim or a wait that
            # ran out: another node may have written it meanwhile, and a HEAD costs less than a PUT.
            self._put(item, unless_there=item.claim is None)
        if item.claim is not None:
            self._drop_claim(item.claim)

    def _put(self, item: _WriteBack, unless_there: bool) -> None:
        """PUT one extent from the local cache (read back and checked against its hash: bytes damaged on disk
        are never shared). A failed write is counted; only a tier that cannot be reached at all is skipped for
        it (a read-only or full tier still serves reads)."""
        try:
            if unless_there and self.writer.exists(item.key):
                return
            block = self.read_back(item.vid, item.start, item.length, item.digest)
            if block is None:
                return  # evicted (or never stored: the cache was full) since, or bad: nothing to share
            self.writer.put(item.key, io.BytesIO(block), {"xxh3": item.digest.hex()})  # a file botocore can rewind
        except (StoreError, OSError) as e:
            self.stats.add(shared_write_errors=1)
            log.debug("shared cache tier: write-back of %s failed: %s", item.key, e)
            if isinstance(e, StoreUnreachable):
                self.health.mark_unreachable(e)
            return
        self.health.answered()
        self.stats.add(shared_bytes_written=item.length)

    def close(self) -> None:
        self.store.close()
        if self.writer is not self.store:
            self.writer.close()


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""
