"""Prometheus metrics on an opt-in address (`metrics.address`, e.g. "127.0.0.1:9101").

Counters are read from the daemon's `Stats` at scrape time (one source of truth with `modelfs stats`);
the fetch latency histogram is observed by the fetcher. The read-wait histogram (how long demand READs
waited: what a loader in D state waits for) is the core's `stats.ReadWaits`, read at scrape time too: the
READs answered at once are a plain count there, added to the lowest bucket here. Served by
prometheus-client's own HTTP server thread, outside the trio loop: a scrape never waits on FUSE work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from modelfs.errors import ConfigError
from modelfs.stats import READ_WAIT_BUCKETS, ReadWaits

log = logging.getLogger(__name__)

#: Stats fields exported as counters `modelfs_<name>_total`.
COUNTERS = {
    "bytes_served": "bytes returned to readers",
    "bytes_fetched": "bytes fetched from the store",
    "gets": "ranged GETs completed",
    "hedged_gets": "extra requests sent for ranged GETs whose requests were all silent (s3.hedge_after)",
    "unhedged_gets": "ranged GETs sent with no room for a hedge (s3.max_request_threads)",
    "body_retries": "GET bodies cut, short or stalled after their headers, asked for again from where they stopped",
    "cache_hits": "READ pieces served from the cache",
    "cache_misses": "READ pieces that waited for a GET",
    "dedup_bytes_saved": "bytes not fetched or not written because the cache held the same content",
    "evictions": "extents evicted from the cache",
    "evicted_bytes": "bytes of extents evicted from the cache",
    "prefetch_bytes": "bytes fetched ahead of readers",
    "pushed_bytes": "bytes pushed into the page cache",
    "cache_full_skips": "extents served from memory because the cache had no room",
    "offline_misses": "uncached reads refused while the store was unreachable",
    "passthrough_opens": "opens answered with FUSE passthrough: the kernel reads the cache file itself",
    "files_checked_at_start": "complete cache files read back and checked from the daemon's start, before any open "
                              "(cache.check_at_start)",
    "passthrough_refused": "times the kernel did not take FUSE passthrough (at mount, or a cache file)",
    "store_retries": "GETs tried again after the store failed them for now (refused, stalled, 5xx)",
    "shared_hits": "extents read from the shared cache tier instead of the origin",
    "shared_misses": "extents the shared cache tier did not have",
    "shared_bytes_read": "bytes read from the shared cache tier",
    "shared_bytes_written": "bytes written back to the shared cache tier",
    "shared_writeback_dropped": "write-backs dropped because their queue was full",
    "shared_waits": "extents waited for in the shared tier while another node fetched them",
    "scrub_bytes": "bytes of cache files the scrub read back from disk and hashed",
    "scrub_healed": "extents the scrub wrote anew in their cache file, from the store's bytes",
    "shared_polls": "listings of the claims this node waited on (one per claimed directory and poll)",
    "shared_wait_expired": "extents another node claimed that did not land in the shared tier in time (the origin "
                           "served them)",
}
#: `modelfs_errors_total{kind=...}`: kind -> Stats field. "internal" counts bugs the supervisor caught.
ERRORS = {k: k for k in ("store_errors", "read_timeouts", "version_changes", "corrupt_extents", "files_corrupt",
                         "cache_write_errors", "push_errors", "scrub_damaged")} | {
    "internal": "internal_errors", "shared": "shared_errors", "shared_write": "shared_write_errors",
    "shared_corrupt": "shared_corrupt"}
#: Point-in-time values exported as gauges.
GAUGES = {
    "bytes_in_cache": "bytes of extents in the cache's files, counted against cache.max_size",
    "files_in_cache": "file versions with at least one extent in the cache",
    "files_complete": "file versions whose every byte is in their cache file (served by passthrough)",
    "fetches_in_flight": "GETs in flight",
    "get_buffer_bytes": "memory of the GET buffers made so far (at most fetch.memory_budget)",
    "memory_extent_bytes": "bytes of extents held in memory because the cache had no room (at most cache.map_budget)",
    "prefetch_queue": "extents waiting for a prefetch worker",
    "files_trusted_sealed": "cache files this daemon trusted at start by their seal, on storage that verifies reads",
    "storage_verifies": "1 where the cache's storage checks every block the kernel reads (btrfs checksums), else 0",
}


class _StatsCollector(Collector):
    def __init__(self, counters: Callable[[], dict[str, int]], offline: Callable[[], bool],
                 read_wait: ReadWaits | None = None) -> None:
        self._counters = counters
        self._offline = offline
        self._read_wait = read_wait

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        snap = self._counters()
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"modelfs_{name}", doc, value=snap.get(name, 0))
        errors = CounterMetricFamily("modelfs_errors", "errors by kind", labels=["kind"])
        for kind, field in ERRORS.items():
            errors.add_metric([kind], snap.get(field, 0))
        yield errors
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"modelfs_{name}", doc, value=snap.get(name, 0))
        yield GaugeMetricFamily("modelfs_offline", "1 while the store is unreachable (offline mode)",
                                value=1 if self._offline() else 0)
        waits = self._read_wait
        if waits is not None:
            total, cum = waits.total, waits.buckets()
            bounds = [*(f"{b:g}" for b in READ_WAIT_BUCKETS), "+Inf"]
            yield HistogramMetricFamily("modelfs_read_wait_seconds",
                                        "time a demand READ waited for its bytes (0 when answered at once)",
                                        buckets=list(zip(bounds, cum, strict=True)), sum_value=total)
            yield GaugeMetricFamily("modelfs_read_wait_max_seconds", "longest wait of a demand READ since start",
                                    value=waits.max)


class Metrics:
    """One daemon's registry: its collector and the fetch latency histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.fetch_seconds = Histogram("modelfs_fetch_seconds", "time of one ranged GET, body included",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                       registry=self.registry)

    def collect_from(self, counters: Callable[[], dict[str, int]], offline: Callable[[], bool],
                     read_wait: ReadWaits | None = None) -> None:
        """Export a core's counters and READ waits (the fetch histogram exists first, so the core gets
        `fetch_seconds.observe` when it is made)."""
        self.registry.register(_StatsCollector(counters, offline, read_wait))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        try:
            start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        except (ValueError, OSError) as e:
            raise ConfigError(f"metrics.address {address!r}: cannot serve metrics there ({e})") from None
        log.info("metrics on http://%s:%s/metrics", host or "127.0.0.1", port)
