"""Configuration: one typed tree, filled from defaults, a TOML file, then command-line overrides.

Every setting is documented in `daemon/modelfs.toml`; a key that is not in this tree is an error that
names it, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfs.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": GiB * 1024, "tb": GiB * 1024, "tib": GiB * 1024}


class Size(int):
    """A byte count; TOML and the CLI accept 8388608, "8MiB", "8M" or "1.5GiB"."""


class Mode(int):
    """A permission mode; accepts 0o444 (TOML int) or "0444"."""


def parse_size(value: Any, key: str) -> Size:
    if isinstance(value, bool):
        raise ConfigError(f"config: {key} must be a size like 8MiB, got {value!r}")
    if isinstance(value, int):
        return Size(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"config: {key} must be a size like 8MiB, got {value!r}")
    return Size(int(float(m.group(1)) * _UNITS[m.group(2).lower()]))


def parse_mode(value: Any, key: str) -> Mode:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        try:
            mode = int(str(value), 8)
        except ValueError:
            raise ConfigError(f"config: {key} must be an octal mode like 0444, got {value!r}") from None
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"config: {key} must be an octal mode like 0444, got {value!r}")
    return Mode(mode)


def _default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/modelfs"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "modelfs")


@dataclass
class S3Config:
    """How to reach an S3-compatible store. Credentials come only from boto3's standard chain."""

    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    addressing_style: str = "auto"
    max_attempts: int = 10
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    hedge_after: float = 1.0
    max_pool_connections: int = 64
    max_request_threads: int = 64


@dataclass
class CacheConfig:
    """The local cache (one file per file version) and its LMDB index."""

    dir: str = field(default_factory=_default_cache_dir)
    extent_size: Size = Size(8 * MiB)
    max_size: Size = Size(0)
    min_free: Size = Size(1 * GiB)
    map_budget: Size = Size(128 * MiB)
    index_map_size: Size = Size(64 * GiB)
    preallocate: bool = True
    copy_shared_after: int = 2
    scrub_rate: Size = Size(32 * MiB)
    scrub_after: float = 60.0
    trust_restarts: bool = False
    check_at_start: Size = Size(64 * GiB)


@dataclass
class FetchConfig:
    """The pool of ranged GETs and local disk I/O threads."""

    concurrency: int = 16
    io_threads: int = 8
    memory_budget: Size = Size(256 * MiB)
    max_request: Size = Size(64 * MiB)
    deadline: float = 30.0
    probe_interval: float = 5.0
    offline_after: float = 10.0
    demand_reserve: int = 2
    prefetch_during_demand: int = 8


def _default_patterns() -> list[str]:
    return ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf"]


@dataclass
class PrefetchConfig:
    """What to fetch before the loader asks for it."""

    whole_file: bool = True
    patterns: list[str] = field(default_factory=_default_patterns)
    concurrency: int = 16
    checkpoint_sets: bool = True
    sequential: bool = True
    initial_window: Size = Size(16 * MiB)
    max_window: Size = Size(1024 * MiB)
    page_cache_push: bool = False
    push_min_available: Size = Size(2 * GiB)


@dataclass
class MountConfig:
    """Kernel-facing settings of the mount."""

    metadata_ttl: float = 60.0
    allow_other: bool = False
    read_ahead_kb: int = 4096
    max_background: int = 0
    fuse_tasks: int = 64
    uid: int = -1
    gid: int = -1
    file_mode: Mode = Mode(0o444)
    dir_mode: Mode = Mode(0o555)
    passthrough: str = "auto"
    passthrough_wait: float = 30.0


@dataclass
class SharedConfig:
    """A cache tier shared by a fleet, on an S3-compatible store or a shared directory: off unless `url`
    is set."""

    url: str = ""
    endpoint_url: str = ""
    deadline: float = 2.0
    write_back: bool = True
    trust: str = "all"
    node_id: str = ""
    flush_on_exit: float = 10.0


@dataclass
class MetricsConfig:
    """Prometheus metrics: off unless an address is given."""

    address: str = ""


@dataclass
class LogConfig:
    level: str = "INFO"
    file: str = ""


@dataclass
class Config:
    """Everything a mount needs. `source` and `mountpoint` may come from the file or the CLI."""

    source: str = ""
    mountpoint: str = ""
    s3: S3Config = field(default_factory=S3Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def get_buffers(self) -> int:
        """GET buffers of one extent each: fetch.concurrency for prefetch plus fetch.demand_reserve that only
        demand GETs take, within fetch.memory_budget (when it binds, the reserve comes out of prefetch's
        share)."""
        return max(1, min(self.fetch.concurrency + self.fetch.demand_reserve,
                          int(self.fetch.memory_budget) // int(self.cache.extent_size)))

    def validate(self) -> None:
        """Reject values that would only fail later, deep inside a mount."""
        es = self.cache.extent_size
        if es < 64 * KiB or es > 256 * MiB or es % 4096:
            raise ConfigError(f"config: cache.extent_size must be a multiple of 4KiB in [64KiB, 256MiB], got {es}")
        positive = (("fetch.concurrency", self.fetch.concurrency), ("fetch.io_threads", self.fetch.io_threads),
                    ("mount.fuse_tasks", self.mount.fuse_tasks),
                    ("s3.max_attempts", self.s3.max_attempts), ("prefetch.concurrency", self.prefetch.concurrency))
        for key, val in positive:
            if val < 1:
                raise ConfigError(f"config: {key} must be at least 1, got {val}")
        if self.cache.scrub_after < 0:
            raise ConfigError(f"config: cache.scrub_after must be >= 0 seconds, got {self.cache.scrub_after}")
        if self.cache.copy_shared_after < 0:
            raise ConfigError(f"config: cache.copy_shared_after must be 0 (never) or more, got "
                              f"{self.cache.copy_shared_after}")
        if self.fetch.demand_reserve < 0:
            raise ConfigError(f"config: fetch.demand_reserve must be >= 0, got {self.fetch.demand_reserve}")
        if self.fetch.prefetch_during_demand < 1:
            raise ConfigError(f"config: fetch.prefetch_during_demand must be at least 1 (prefetch must always "
                              f"progress), got {self.fetch.prefetch_during_demand}")
        if self.fetch.max_request < es:
            raise ConfigError(f"config: fetch.max_request must be at least cache.extent_size ({es}), "
                              f"got {self.fetch.max_request}")
        if self.cache.map_budget < es:
            raise ConfigError(f"config: cache.map_budget must be at least cache.extent_size ({es}), "
                              f"got {self.cache.map_budget}")
        if self.fetch.memory_budget < 2 * es:
            raise ConfigError(f"config: fetch.memory_budget must be at least 2 x cache.extent_size ({2 * es}), "
                              f"got {self.fetch.memory_budget}")
        if self.prefetch.initial_window <= 0 or self.prefetch.max_window < self.prefetch.initial_window:
            raise ConfigError("config: prefetch.max_window must be >= prefetch.initial_window > 0")
        for key, secs in (("fetch.deadline", self.fetch.deadline), ("fetch.probe_interval", self.fetch.probe_interval),
                          ("fetch.offline_after", self.fetch.offline_after),
                          ("s3.connect_timeout", self.s3.connect_timeout), ("s3.read_timeout", self.s3.read_timeout)):
            if secs <= 0:
                raise ConfigError(f"config: {key} must be a positive number of seconds, got {secs}")
        if self.s3.hedge_after < 0:
            raise ConfigError(f"config: s3.hedge_after must be 0 (never) or a positive number of seconds, got "
                              f"{self.s3.hedge_after}")
        if self.s3.max_request_threads < 0:
            raise ConfigError(f"config: s3.max_request_threads must be 0 (no hedging) or more, got "
                              f"{self.s3.max_request_threads}")
        if self.cache.max_size and self.cache.max_size < 2 * es:
            raise ConfigError(f"config: cache.max_size must be 0 (no quota) or at least 2 x cache.extent_size "
                              f"({2 * es}), got {self.cache.max_size}")
        if self.mount.metadata_ttl < 0:
            raise ConfigError(f"config: mount.metadata_ttl must be >= 0, got {self.mount.metadata_ttl}")
        if self.s3.addressing_style not in ("auto", "path", "virtual"):
            raise ConfigError(f"config: s3.addressing_style must be auto, path or virtual, got "
                              f"{self.s3.addressing_style!r}")
        if self.mount.passthrough not in ("auto", "on", "off", "verified"):
            raise ConfigError("config: mount.passthrough must be auto, on, off or verified, got "
                              f"{self.mount.passthrough!r}")
        if self.mount.passthrough_wait < 0:
            raise ConfigError(f"config: mount.passthrough_wait must be >= 0 seconds, got {self.mount.passthrough_wait}")
        if self.shared.trust not in ("all", "manifest"):
            raise ConfigError(f"config: shared.trust must be all or manifest, got {self.shared.trust!r}")
        if self.shared.flush_on_exit < 0:
            raise ConfigError(f"config: shared.flush_on_exit must be >= 0 seconds, got {self.shared.flush_on_exit}")
        if self.shared.deadline <= 0:
            raise ConfigError(f"config: shared.deadline must be a positive number of seconds, got "
                              f"{self.shared.deadline}")
        if self.shared.url and not self.shared.url.startswith(("s3://", "file:///")):
            raise ConfigError(f"config: shared.url must be s3://BUCKET/PREFIX or file:///DIR, "
                              f"got {self.shared.url!r}")
        if self.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"config: log.level must be DEBUG, INFO, WARNING or ERROR, got {self.log.level!r}")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is Size:
        return parse_size(value, key)
    if typ is Mode:
        return parse_mode(value, key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config: {key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config: {key} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+(\.[0-9]*)?\s*", value):
            return float(value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"config: {key} must be a number, got {value!r}")
        return float(value)
    if typ == "list[str]":
        if isinstance(value, str):  # from -o: comma-separated
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config: {key} must be a list of strings, got {value!r}")
        return list(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config: {key} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {typ!r}")


_TYPES: dict[str, Any] = {"Size": Size, "Mode": Mode, "int": int, "float": float, "bool": bool, "str": str,
                          "list[str]": "list[str]"}


def _apply(obj: Any, data: dict[str, Any], prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        f = fields.get(name)
        if f is None:
            raise ConfigError(f"config: unknown key '{key}'")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config: '{key}' must be a table of settings")
            _apply(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, _TYPES[str(f.type)], key))


def set_option(cfg: Config, dotted: str, value: Any) -> None:
    """Apply one `section.key=value` override (from `-o` or a mount helper)."""
    parts = dotted.split(".")
    data: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        data = {part: data}
    _apply(cfg, data, "")


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides` (dotted keys); validated."""
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config: file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
        _apply(cfg, data, "")
    for key, value in (overrides or {}).items():
        set_option(cfg, key, value)
    cfg.validate()
    return cfg
