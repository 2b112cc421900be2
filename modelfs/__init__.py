"""modelfs: remote model checkpoints as read-only local files, over FUSE."""

from __future__ import annotations

__version__ = "0.1.0"
