"""What the kernel offers passthrough: whether it was negotiated, and registering a backing file. The live
one is pyfuse3's (`live`); the rules of `opens` are tested against one a test holds (`Kernel` takes the three
calls), without root or a kernel that has passthrough."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyfuse3

from modelfs.config import Config
from modelfs.errors import ConfigError

log = logging.getLogger(__name__)


class Kernel:
    """What the kernel offers: whether passthrough was negotiated, and registering a backing file (FUSE
    DEV_IOC_BACKING_OPEN / _CLOSE). The live one is pyfuse3's; tests may pass one that refuses."""

    def __init__(self, negotiated: Callable[[], bool], register: Callable[[int], int],
                 unregister: Callable[[int], None]) -> None:
        self.negotiated = negotiated
        self.register = register
        self.unregister = unregister


def live(cfg: Config) -> Kernel | None:
    """pyfuse3's FUSE passthrough calls, unless mount.passthrough is off; `on` with a pyfuse3 built
    without them refuses to start (daemon/fuse3/build.sh builds it)."""
    if cfg.mount.passthrough == "off":
        return None
    if not hasattr(pyfuse3, "passthrough_open"):
        if cfg.mount.passthrough == "on":
            raise ConfigError("mount.passthrough = on, but pyfuse3 was built without FUSE passthrough "
                              "(build it with daemon/fuse3/build.sh)")
        log.warning("FUSE passthrough unavailable: pyfuse3 was built without it (daemon/fuse3/build.sh)")
        return None
    return Kernel(pyfuse3.passthrough_enabled, pyfuse3.passthrough_open, pyfuse3.passthrough_close)
