"""Which files make one sharded checkpoint: the shards of a `name-0000K-of-0000N.ext` set, or the files an
`*.index.json` (safetensors and torch's weight maps) names. Names only; what to do with them is the
prefetcher's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

SHARD = re.compile(r"^(?P<stem>.+)-(?P<k>\d+)-of-(?P<n>\d+)(?P<ext>\.[^/]+)$")
INDEX_SUFFIX = ".index.json"
#: An index larger than this is not read for its names (a weight map is kilobytes).
MAX_INDEX = 64 << 20


def is_index(name: str) -> bool:
    return name.endswith(INDEX_SUFFIX)


def in_a_set(name: str) -> bool:
    """Whether `name` is an index or one shard of a set."""
    return is_index(name) or SHARD.match(name) is not None


def named_by_index(index: bytes) -> list[str]:
    """The files an index's weight map names, sorted; ValueError if it is not one."""
    doc = json.loads(index)
    if not isinstance(doc, dict):
        raise ValueError("not a weight map")
    return sorted(set(doc.get("weight_map", {}).values()))


def others_of(name: str, siblings: Iterable[str]) -> list[str]:
    """The other shards of the set shard `name` belongs to, among `siblings` (its directory), sorted."""
    m = SHARD.match(name)
    if m is None:
        return []
    return sorted(n for n in siblings if (s := SHARD.match(n)) and s["stem"] == m["stem"] and s["n"] == m["n"]
                  and s["ext"] == m["ext"] and n != name)
