"""The fleet tier (`shared.url`): extents a fleet shares on an S3-compatible store, in front of the origin.

    layout     the keys: content, version and claim keys
    claims     cooperative fetch: one node of those that miss an extent fetches it
    writeback  what came from the origin, written to the tier in the background
    tier       the tier as a source of extents (`sources.Source`) wrapping the origin
"""

from modelfs.shared.layout import LAYOUT, claim_key, content_key, version_key
from modelfs.shared.tier import SharedTier

__all__ = ["LAYOUT", "SharedTier", "claim_key", "content_key", "version_key"]
