"""Seals: trust that outlives the daemon (`integrity`): a complete, checked file's identity recorded in the
index, so that a later daemon trusts it without reading it back."""

from __future__ import annotations

import logging
import os

from modelfs.cache import integrity
from modelfs.cache.base import CacheBase
from modelfs.cache.files import File

log = logging.getLogger(__name__)


class Seals(CacheBase):
    """The seals of `FileCache`."""

    def _trust_sealed(self, f: File, seal: object) -> None:
        """At start, a complete file: trusted whole if the seal recorded for it still names it as it is
        (`integrity`, invariants 2-3 and 5; one open, one fstat, on fs-verity one MEASURE). An fs-verity file is
        read-only whether or not its seal holds (a crash between turning verity on and recording the seal
        leaves one without)."""
        try:
            fd = os.open(self.path(f.vid), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            ident = integrity.identity(os.fstat(fd))
            if self.storage.kind == integrity.VERITY:
                try:
                    digest = integrity.measure_verity(fd).hex()
                except OSError:
                    return  # verity not on: checked like on any other storage
                f.immutable = True
                holds = isinstance(seal, dict) and digest == seal.get("verity") and \
                    (ident["ino"], ident["size"]) == (seal.get("ino"), seal.get("size"))
            elif self.storage.verifies:
                holds = ident == seal and not integrity.no_cow(fd)
            else:
                holds = {**ident, "boot": self._boot} == seal
        except OSError:
            return
        finally:
            os.close(fd)
        if holds:
            f.trusted.update(f.present)  # the storage checks every block read, or a daemon of this boot did
            f.durable = True
            self.files_trusted_sealed += 1

    def unsealed(self) -> list[bytes]:
        """Files to seal: complete, every extent checked by this process, no seal of them as they are now."""
        with self._lock:
            return [f.vid for f in self._files.values() if f.all_trusted and not f.durable and not f.pending]

    def seal(self, vid: bytes) -> bool:
        """Record a complete, checked file's identity, its data made durable first on verifying storage, so
        that a later daemon trusts it without reading it back (worker thread; `integrity`, invariants 1 and 5).
        False if it changed meanwhile or the storage keeps no checksums of it."""
        verity = self.storage.kind == integrity.VERITY
        with self._lock:
            f = self._files.get(vid)
            if f is None or not f.all_trusted or f.durable or f.pending or (verity and f.reading):
                return False
            was_immutable = f.immutable  # an fs-verity file already (its seal did not hold at start): stays so
            try:
                if verity:  # no writable fd may be open for verity to go on: the cache's own is closed first
                    if f.fd >= 0:
                        os.close(f.fd)
                        f.fd = -1
                        self._fds.pop(vid, None)
                    f.immutable = True  # from now on it is opened read-only
                    fd = os.open(self.path(vid), os.O_RDONLY | os.O_CLOEXEC)
                else:
                    fd = os.dup(self._fd(f))
            except OSError:
                f.immutable = was_immutable
                return False
            f.pending += 1  # not deleted under the seal
            writes = self._writes
        try:
            if self.storage.verifies:  # else the seal names this boot: an OS crash, which could lose data, ends it
                if not verity and integrity.no_cow(fd):
                    return False
                os.fdatasync(fd)
            if verity:
                integrity.enable_verity(fd)  # reads and hashes the whole file once more (SHA-256)
            ident: dict[str, int | str] = dict(integrity.identity(os.fstat(fd)))
            if verity:
                ident["verity"] = integrity.measure_verity(fd).hex()
            elif not self.storage.verifies:
                ident["boot"] = self._boot
            with self._lock:
                if not f.all_trusted or self._files.get(vid) is not f or any(
                        f.generation.get(s, 0) > writes for s in f.present):
                    return False  # an extent dropped or written again meanwhile: sealed another time
            if not self.index.seal(vid, ident):
                return False
            with self._lock:
                f.durable = f.all_trusted
            return True
        except OSError as e:
            log.debug("cache file of version %s not sealed: %s", vid.hex(), e.strerror or e)
            if verity:
                with self._lock:
                    f.immutable = was_immutable  # verity did not go on: writable again, unless it was on before
            return False
        finally:
            os.close(fd)
            with self._lock:
                f.pending -= 1
