"""The file cache: each file version the daemon serves has one file on local disk, written in place as its
extents arrive; once every extent is in, that same file is what the kernel serves by FUSE passthrough.

Layout (`cachedir.CacheDir.files`): `<cache>/files/<vid hex>`, a sparse file of the version's size. The bytes
of an extent are at the extent's own offset once it is present (the index's present table says which). So
a cold byte is received once (into a GET buffer), hashed once (there), written once (here) and then served
from this file: by READs through the daemon until the file is complete, by the kernel after that. No
second copy of it is ever made on disk.

Identical content is stored once per trust domain (one source bucket by default: xxh3 is fast, not
collision-resistant): an extent whose hash another present extent has is not fetched again. Where the
filesystem shares extents (btrfs, XFS: `FICLONERANGE`), it is cloned into the version's own file, which
costs no disk; elsewhere (ext4) it is read from the file that holds it (`locate`), and only copied into the
version's own file (`copy_in`, in the kernel) once that version has been loaded often enough to be worth a
second copy on disk and passthrough (`cache.copy_shared_after`).

Trust: files are not fsync'ed, and anything running as root may write them. A present extent is served only
once this process trusts it: it wrote it from bytes it hashed, or read it back and hashed it (`verify`). An
extent found damaged is punched out, unrecorded and fetched again (`drop`).

Concurrency: every method that touches the disk blocks (worker threads), except `pread` with `nowait`, which
the trio thread may call (it reads only what the page cache holds). In-memory state is guarded by one lock
held only for bookkeeping, never across I/O. An extent is punched out (eviction, damage) only while no read
of it is in progress (`_File.reading`, counted under the lock around every read), after it was marked
absent under the lock: no read can ever see the hole.

Space: present extents of every domain count against `cache.max_size` (in whole pages: what the disk
holds), and the cache filesystem keeps `cache.min_free` free. Room is made least recently used first: a file
still filling gives up single extents, punched out of it (out to page edges no other extent uses), never one
being read; a complete file is deleted whole, never punched, unless a passthrough open holds it (`hold`). A
complete file may have been handed to the kernel for passthrough, by this daemon or an earlier one, and a
loader that mapped it keeps that mapping after its fd, the backing id and even the daemon are gone: its
bytes must never change under it, and a deleted file stays whole for such a mapping until it goes (its disk
space with it). A file left with no extent is deleted. When no room can be made, or the disk is full
regardless (ENOSPC), `write` raises CacheFull and the caller serves the bytes from memory: a full cache
costs warmth, never a failed read.

The package, bottom up (`FileCache` is the whole, one class over one lock):

    diskio     whole writes and reads, preallocation, hole punching, shared extents, pages
    files      what the cache knows of one version's file, and of an extent being punched out
    base       the state, fds, reads in progress, what is where, the start-up scan
    space      the quota, eviction and hole punching
    checks     reads that check what they read, damage dropped; the scrub's reads and in-place heal
    seals      trust that outlives the daemon (`integrity`)
    filecache  writes, and the whole
"""

from modelfs.cache.checks import CHECK_CHUNK
from modelfs.cache.filecache import FileCache
from modelfs.cache.files import CacheFull

__all__ = ["CHECK_CHUNK", "CacheFull", "FileCache"]
