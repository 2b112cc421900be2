"""The cache directory: its layout and its lock, known here and nowhere else.

    <cache>/
      lock          flock held by the one process that may write here (a daemon, or `modelfs cache gc`);
                    it holds that process's pid, for the error the next one shows
      index/        the LMDB chunk index (`index.ChunkIndex`): extent hashes, which extents are present, and
                    the seal of each complete file on storage that verifies what it reads (`integrity`)
      files/        one sparse file per file version, `files/<version id hex>`, its bytes at their own
                    offsets (`cache.FileCache`); a complete one is what FUSE passthrough serves
      pins.json     models never evicted (`admin`)
      modelfs.log   the daemon's log when it runs detached (unless log.file says otherwise)

Earlier layouts kept content-addressed blocks in `blocks/` and passthrough copies in `backing/`: a daemon
that finds them removes them at start (their index entries stay true; only cache warmth is lost).

The directory and everything modelfs creates in it are private to the user that runs the daemon (0700
directories, 0600 files): the files are the user's model weights.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil

from modelfs.errors import ConfigError

log = logging.getLogger(__name__)

#: Directories of earlier layouts (content-addressed blocks, passthrough copies), removed at start.
OLD_LAYOUT = ("blocks", "backing")


class CacheDir:
    """Paths of one cache directory, and its lock."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.index = os.path.join(self.path, "index")
        self.files = os.path.join(self.path, "files")
        self.pins = os.path.join(self.path, "pins.json")
        self.log = os.path.join(self.path, "modelfs.log")
        self._lock = os.path.join(self.path, "lock")

    def __str__(self) -> str:
        return self.path

    def has_index(self) -> bool:
        """Whether a daemon ever wrote an index here (offline mode needs one)."""
        return os.path.exists(os.path.join(self.index, "data.mdb"))

    def remove_old_layout(self) -> None:
        """Remove what an earlier layout left (under the lock: nothing else writes here)."""
        for name in OLD_LAYOUT:
            old = os.path.join(self.path, name)
            if os.path.isdir(old):
                log.info("removing %s: the cache keeps whole files now (%s refills as models load)", old, self.path)
                shutil.rmtree(old, ignore_errors=True)

    def create(self) -> None:
        """Make the directory (0700) if need be; one line for users if that cannot be done."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"cache dir {self.path} is not a directory") from None
        except OSError as e:
            raise ConfigError(f"cache dir {self.path} is not writable: {e.strerror}") from None
        if not os.path.isdir(self.path):
            raise ConfigError(f"cache dir {self.path} is not a directory")

    def lock(self) -> int:
        """Take the directory for this process (LMDB has one writer); returns the held lock fd."""
        self.create()
        try:
            fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"cache dir {self.path} is not writable: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"cache dir {self.path} is in use by another modelfs daemon (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
