"""Where the fleet tier keeps what (version 1), under the prefix of `shared.url`:

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

Which key an extent goes under depends only on its file version: manifest versions use content keys (their
readers know every hash: `sources.Block.digest`), other versions use version keys. Every node picks the
same one. A key's bytes never change, so nothing is ever invalidated, and any object may vanish at any time
(the bucket's lifecycle rules are its eviction): a vanished object is a miss.
"""

from __future__ import annotations

import os
import socket

import xxhash

from modelfs.config import Config
from modelfs.remote.sources import Block

LAYOUT = "v1"


def domain_dir(domain: str) -> str:
    return xxhash.xxh3_64_hexdigest(domain.encode())


def content_key(domain: str, digest: bytes) -> str:
    return f"{LAYOUT}/{domain_dir(domain)}/{digest.hex()}"


def version_key(domain: str, vid: bytes, offset: int) -> str:
    return f"{LAYOUT}/{domain_dir(domain)}/ver/{vid.hex()}/{offset}"


def claim_key(key: str) -> str:
    return f"{LAYOUT}/claims/{key.removeprefix(LAYOUT + '/')}"


def block_key(domain: str, block: Block, manifest_only: bool) -> str | None:
    """Where `block` lives in the tier; None if it may not be read from or written to it (`shared.trust =
    manifest`: only extents a manifest names by hash)."""
    if block.digest is not None:
        return content_key(domain, block.digest)
    return None if manifest_only else version_key(domain, block.vid, block.start)


def node_id(cfg: Config) -> str:
    """This node's name in cooperative fetch: `shared.node_id`, else hostname and cache dir (two daemons
    on one host are two nodes)."""
    return cfg.shared.node_id or f"{socket.gethostname()}:{os.path.abspath(cfg.cache.dir)}"
