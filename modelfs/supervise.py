"""Supervised background work: no failure in a background task can stop the FUSE loop.

Every task the daemon runs beside pyfuse3's request handlers (fetch flights, prefetch workers and
scheduling steps, the offline probe, the idle trim, signal handling) is started with `Supervisor.spawn`.
An exception escaping such a task is logged once with its traceback, counted (`internal_errors`, exported
as `modelfs_errors_total{kind="internal"}`), handed to the task's `on_error` (a flight fails its readers
with EIO, a prefetch job stops) and goes no further: the nursery that also runs `pyfuse3.main` never sees
it, so it never cancels the handlers in flight (a cancelled handler would leave its request unanswered,
and a page-cache push waiting on that request's page would sleep in the kernel for good). A long-lived
loop (`restart=True`) starts again after a pause. Only cancellation, at shutdown, ends supervised work.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from modelfs.stats import Stats

log = logging.getLogger(__name__)

#: Seconds before a long-lived loop that failed is started again.
RESTART_PAUSE = 1.0


class Supervisor:
    """Starts tasks so that an exception in one is its own failure, not the nursery's. Made before the
    parts that spawn work (they get it at construction); tasks run while `running()` is entered."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[trio.Nursery]:
        """Open the nursery that owns every supervised task, for as long as the block; leaving the block
        waits for them, so the caller cancels the nursery's scope when it is done serving."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            yield nursery

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "",
              on_error: Callable[[BaseException], None] | None = None, restart: bool = False) -> None:
        """Run `fn(*args)` in the nursery, supervised."""
        if self._nursery is None:
            raise RuntimeError("Supervisor.running() was not entered")
        self._nursery.start_soon(self._run, fn, args, name or getattr(fn, "__qualname__", repr(fn)), on_error,
                                restart, name=name or None)

    async def _run(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], name: str,
                   on_error: Callable[[BaseException], None] | None, restart: bool) -> None:
        while True:
            try:
                await fn(*args)
                return
            except Exception as e:
                self.failed(name, e)
                if on_error is not None:
                    try:
                        on_error(e)
                    except Exception as again:
                        self.failed(f"error handler of {name}", again)
            if not restart:
                return
            await trio.sleep(RESTART_PAUSE)

    def failed(self, what: str, e: BaseException) -> None:
        """Log and count an internal error (a bug, not a store or disk failure); the mount keeps serving."""
        self.stats.add(internal_errors=1)
        log.error("internal error in %s (the mount keeps serving): %s: %s", what, type(e).__name__, e,
                  exc_info=(type(e), e, e.__traceback__))
