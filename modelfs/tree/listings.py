"""Directory listings and published manifests: what the namespace and file versions are built from.

A listing comes from the store, is saved in the index (`index.ChunkIndex.save_listing`), and the saved one
answers while the store is unreachable (offline mode), so a file the mount has listed never turns into
ENOENT because the store cannot be reached. A directory with a `.modelfs/manifest.json` gets its files'
content-defined extents from it (`manifest`), trusted per object version (ETag and size must match).
"""

from __future__ import annotations

import logging

import trio

from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.manifest import DIR as MANIFEST_DIR
from modelfs.catalog.manifest import NAME as MANIFEST_NAME
from modelfs.catalog.manifest import FileEntry, Manifest, ManifestError
from modelfs.catalog.version import HashedExtent
from modelfs.errors import ModelfsError, StoreError, StoreUnreachable
from modelfs.health import Health
from modelfs.remote import Listing, ObjectInfo, Store, read_bytes
from modelfs.retry import STORE_PAUSES

log = logging.getLogger(__name__)

#: A manifest larger than this is not read (a directory of checkpoints needs a fraction of it).
MANIFEST_MAX = 256 << 20


class Listings:
    """The store's listings, saved for offline mode, and the manifests they point to."""

    def __init__(self, store: Store, index: ChunkIndex, health: Health, deadline: float,
                 meta_limiter: trio.CapacityLimiter, io_limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.index = index
        self.health = health
        self.deadline = deadline
        self.meta_limiter = meta_limiter  # store listings and manifest GETs
        self.io_limiter = io_limiter  # the index on the local disk
        self._manifests: dict[str, FileEntry] = {}  # full key -> published extents of that key
        self._manifest_etags: dict[str, str] = {}  # prefix -> ETag of the manifest applied

    def layout(self, info: ObjectInfo) -> list[HashedExtent] | None:
        """The published extents of this object version, if a manifest describes it (same ETag and size)."""
        entry = self._manifests.get(info.key)
        return entry.extents if entry and entry.etag == info.etag and entry.size == info.size else None

    async def list_dir(self, prefix: str) -> Listing:
        """The store's listing, saved for offline mode. When the store fails it for now (an overloaded
        store refuses, cuts or 5xx's: not an outage), the saved listing answers; a directory never listed
        before is asked again, with pauses, until fetch.deadline or offline mode, so a load rides out an
        overloaded store rather than get EIO on a directory it has not reached yet."""
        until = trio.current_time() + self.deadline
        pauses = STORE_PAUSES.start()
        while not self.health.offline and trio.current_time() < until:
            try:
                with trio.fail_at(until):
                    listing = await trio.to_thread.run_sync(self.store.list_dir, prefix, limiter=self.meta_limiter,
                                                            abandon_on_cancel=True)
            except trio.TooSlowError:
                self.health.mark_unreachable(TimeoutError(f"no listing within {self.deadline:g} s"))
                break
            except StoreError as e:
                if not e.transient:
                    raise
                if isinstance(e, StoreUnreachable):
                    self.health.mark_unreachable(e)
                saved = await self._saved(prefix)
                if saved is not None:
                    log.info("listing of /%s failed (%s): the saved listing answers", prefix, e)
                    return saved
                if trio.current_time() + pauses.upcoming >= until:
                    break
                pause = pauses.draw()
                log.debug("listing of /%s failed (%s): trying again in %.2f s", prefix, e, pause)
                await trio.sleep(pause)
            else:
                self.health.answered()
                await trio.to_thread.run_sync(self.index.save_listing, self.store.identity, prefix, listing,
                                              limiter=self.io_limiter)
                if MANIFEST_DIR in listing.dirs:
                    await self._load_manifest(prefix)
                return listing
        saved = await self._saved(prefix)
        if saved is None:
            raise self.health.unreachable_error(f"the listing of /{prefix}")
        return saved

    async def _saved(self, prefix: str) -> Listing | None:
        """The listing of `prefix` saved when the store last gave it (and its saved manifest, applied)."""
        saved = await trio.to_thread.run_sync(self.index.load_listing, self.store.identity, prefix,
                                              limiter=self.io_limiter)
        if saved is not None and MANIFEST_DIR in saved.dirs and prefix not in self._manifest_etags:
            raw = await trio.to_thread.run_sync(self.index.load_manifest, self.store.identity, prefix,
                                                limiter=self.io_limiter)
            if raw is not None:
                self._apply_manifest(prefix, "offline", raw)
        return saved

    async def _load_manifest(self, prefix: str) -> None:
        """Read `<prefix>.modelfs/manifest.json` (when it changed) and remember its entries."""
        def fetch() -> tuple[str, bytes] | None:
            found = dict(self.store.list_dir(f"{prefix}{MANIFEST_DIR}/").objects).get(MANIFEST_NAME)
            if found is None or found.etag == self._manifest_etags.get(prefix):
                return None
            if found.size > MANIFEST_MAX:
                raise ManifestError(f"manifest of /{prefix} is {found.size} bytes: ignored")
            raw = read_bytes(self.store, found, 0, found.size)
            self.index.save_manifest(self.store.identity, prefix, raw)
            return found.etag, raw

        try:
            got = await trio.to_thread.run_sync(fetch, limiter=self.meta_limiter)
        except (ModelfsError, OSError) as e:
            log.warning("manifest of /%s not used (%s): its files are read with fixed extents", prefix, e)
            return
        if got is not None:
            self._apply_manifest(prefix, *got)

    def _apply_manifest(self, prefix: str, etag: str, raw: bytes) -> None:
        try:
            man = Manifest.loads(raw)
        except ManifestError as e:
            log.warning("manifest of /%s not used (%s): its files are read with fixed extents", prefix, e)
            return
        self._manifest_etags[prefix] = etag
        for rel, entry in man.files.items():
            self._manifests[prefix + rel] = entry
        log.info("manifest of /%s: %d files with content-defined extents", prefix, len(man.files))
