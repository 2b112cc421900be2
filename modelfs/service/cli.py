"""The `modelfs` command: mount, umount, stats, prefetch, publish.

Errors reach the user as one line (`modelfs: error: ...`) and a non-zero exit; tracebacks only go
to the daemon's log, and only for bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, NoReturn

from modelfs import __version__
from modelfs.config import Config, load_config
from modelfs.errors import ModelfsError
from modelfs.fuse import xattrs
from modelfs.service.launch import run_foreground, spawn_daemon
from modelfs.stats import human

log = logging.getLogger("modelfs")

def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ModelfsError(f"-o expects SECTION.KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def mount_config(args: argparse.Namespace) -> Config:
    overrides = _parse_overrides(args.option or [])
    flags = {"source": args.source, "mountpoint": args.mountpoint, "cache.dir": args.cache_dir,
             "s3.endpoint_url": args.endpoint_url, "cache.extent_size": args.extent_size,
             "log.level": args.log_level, "log.file": args.log_file}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.allow_other:
        overrides["mount.allow_other"] = True
    cfg = load_config(args.config, overrides)
    if not cfg.s3.endpoint_url and os.environ.get("AWS_ENDPOINT_URL"):
        cfg.s3.endpoint_url = os.environ["AWS_ENDPOINT_URL"]
    return cfg


def cmd_mount(args: argparse.Namespace) -> int:
    cfg = mount_config(args)
    if args.foreground:
        return run_foreground(cfg, args.ready_fd)
    return spawn_daemon(cfg, args.argv)


def cmd_umount(args: argparse.Namespace) -> int:
    from modelfs.service.mount import unmount

    unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    return 0


def read_stats(mountpoint: str) -> dict[str, int]:
    try:
        raw = os.getxattr(mountpoint, xattrs.STATS)
    except OSError as e:
        raise ModelfsError(f"{mountpoint} is not a live modelfs mount ({e.strerror})") from None
    counters: dict[str, int] = json.loads(raw)
    return counters


def cmd_stats(args: argparse.Namespace) -> int:
    stats = read_stats(args.mountpoint)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    for key, value in stats.items():
        shown = f"{value:,}" if not key.startswith("bytes") and "bytes" not in key else f"{human(value)} ({value:,})"
        print(f"{key:22} {shown}")
    return 0


def _files_under(paths: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for path in paths:
        if os.path.isdir(path):
            for dirpath, dirs, files in os.walk(path):
                dirs.sort()
                out += [(p, os.path.getsize(p)) for p in (os.path.join(dirpath, f) for f in sorted(files))]
        elif os.path.isfile(path):
            out.append((path, os.path.getsize(path)))
        else:
            raise ModelfsError(f"{path}: no such file or directory")
    return out


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Warm the cache with whole files, showing bytes, rate and ETA; non-zero if any file failed."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    files = _files_under(args.paths)
    for path, _ in files[:1]:
        try:
            os.getxattr(path, xattrs.CACHED)
        except OSError:
            raise ModelfsError(f"{path} is not on a modelfs mount") from None
    done: dict[str, int] = {}
    failed: list[str] = []
    fetched = 0
    stop = threading.Event()

    def warm(path: str) -> None:
        nonlocal fetched
        try:
            result = json.loads(os.getxattr(path, xattrs.PREFETCH))
            fetched += result["fetched"]
        except OSError as e:
            failed.append(f"{path}: {e.strerror}")
        done[path] = os.path.getsize(path)

    with tqdm(total=sum(size for _, size in files), unit="B", unit_scale=True, unit_divisor=1024,
              desc="prefetch", disable=args.quiet) as bar:
        def poll() -> None:
            while not stop.wait(0.5):
                partial = 0
                for path, _size in files:
                    if path not in done:
                        try:
                            partial += int(os.getxattr(path, xattrs.CACHED))
                        except (OSError, ValueError):
                            pass
                bar.update(sum(done.values()) + partial - bar.n)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(warm, (p for p, _ in files)))
        stop.set()
        poller.join()
        bar.update(sum(done.values()) - bar.n)
    for line in failed:
        print(f"modelfs: error: {line}", file=sys.stderr)
    if not args.quiet:
        print(f"modelfs: {len(files) - len(failed)} of {len(files)} files in the cache, "
              f"{human(fetched)} fetched from the store")
    return 1 if failed else 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `modelfs: error:` line, like every other error (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("modelfs").strip()
        self.exit(2, f"modelfs: error: {where + ': ' if where else ''}{message} (see --help)\n")


def cmd_du(args: argparse.Namespace) -> int:
    """Logical, unique, cached and still-to-fetch bytes per file and in total (dedup across files)."""
    from modelfs.reads.extents import usage

    maps: list[tuple[str, dict[str, object]]] = []
    for path, _ in _files_under(args.paths):
        try:
            maps.append((path, json.loads(os.getxattr(path, xattrs.EXTENTS))))
        except OSError as e:
            raise ModelfsError(f"{path} is not on a modelfs mount ({e.strerror})") from None
    rows, totals = usage(maps)
    if args.json:
        print(json.dumps({"files": dict(rows), "total": totals}, indent=2))
        return 0
    cols = ("logical", "unique", "cached", "to_fetch")
    print(f"{'logical':>12} {'unique':>12} {'cached':>12} {'to fetch':>12}  path")
    for path, row in [*rows, ("total (shared extents counted once)", totals)]:
        print(" ".join(f"{human(row[c]):>12}" for c in cols) + f"  {path}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Upload LOCAL_DIR to s3://BUCKET/PREFIX with a manifest; --verify checks every extent afterwards."""
    from tqdm import tqdm

    from modelfs.config import S3Config, parse_size
    from modelfs.service import publish as pub

    if len(args.paths) == 2:
        local_dir, url = args.paths
    elif len(args.paths) == 1 and args.verify:
        local_dir, url = None, args.paths[0]
    else:
        raise ModelfsError("publish expects LOCAL_DIR s3://BUCKET/PREFIX (or --verify s3://BUCKET/PREFIX)")
    if not url.startswith("s3://"):
        raise ModelfsError(f"publish: destination must be s3://BUCKET/PREFIX, got {url!r}")
    s3 = S3Config(endpoint_url=args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", ""))
    max_extent = parse_size(args.max_extent, "--max-extent")

    def bar(desc: str) -> tqdm:
        return tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=args.quiet)

    if local_dir is not None:
        with bar("upload") as b:
            report = pub.publish(local_dir, url, s3, int(max_extent), args.jobs, progress=b.update,
                                 on_total=lambda n: setattr(b, "total", n))
        print(f"modelfs: published {len(report.uploaded)} files ({human(report.bytes_uploaded)}) to {url}, "
              f"{len(report.skipped)} already there; manifest written")
    if args.verify:
        with bar("verify") as b:
            problems = pub.verify(url, s3, progress=b.update, on_total=lambda n: setattr(b, "total", n))
        for p in problems:
            print(f"modelfs: {p}", file=sys.stderr)
        if problems:
            print(f"modelfs: error: {len(problems)} problems in the manifest of {url}", file=sys.stderr)
            return 1
        print(f"modelfs: every extent of {url} matches its manifest")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelfs", description="Serve remote model checkpoints as read-only files.")
    p.add_argument("--version", action="version", version=f"modelfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount s3://BUCKET/PREFIX or a directory at MOUNTPOINT")
    m.add_argument("source", nargs="?", help="s3://BUCKET/PREFIX or a local directory")
    m.add_argument("mountpoint", nargs="?", help="an empty directory")
    m.add_argument("--config", help="TOML configuration file (see daemon/modelfs.toml)")
    m.add_argument("--cache-dir", help="cache files and index directory")
    m.add_argument("--endpoint-url", help="S3 endpoint (default: config, then AWS_ENDPOINT_URL, then AWS)")
    m.add_argument("--extent-size", help="fetch and cache unit, e.g. 8MiB")
    m.add_argument("--allow-other", action="store_true", default=None, help="let other users read the mount")
    m.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    m.add_argument("--log-file", help="log here instead of stderr / <cache-dir>/modelfs.log")
    m.add_argument("-o", "--option", action="append", metavar="SECTION.KEY=VALUE", help="any config setting")
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached; log to stderr")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit")
    u.add_argument("mountpoint")
    u.add_argument("--lazy", action="store_true", help="detach now even if files are open")
    u.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the daemon to exit (it may first hand on write-backs to a shared tier)")
    u.set_defaults(func=cmd_umount)

    pf = sub.add_parser("prefetch", help="fetch files or directories of a mount into the cache")
    pf.add_argument("paths", nargs="+", metavar="PATH")
    pf.add_argument("-j", "--jobs", type=int, default=4, help="files warmed at once")
    pf.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pf.set_defaults(func=cmd_prefetch)

    pb = sub.add_parser("publish", help="upload a checkpoint dir to S3 with a manifest of its extents")
    pb.add_argument("paths", nargs="+", metavar="LOCAL_DIR s3://BUCKET/PREFIX")
    pb.add_argument("--verify", action="store_true", help="check every manifest extent against the objects")
    pb.add_argument("--max-extent", default="8MiB", help="longest extent (tensors are split from their start)")
    pb.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL, then AWS)")
    pb.add_argument("-j", "--jobs", type=int, default=8, help="parallel multipart transfers")
    pb.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pb.set_defaults(func=cmd_publish)

    st = sub.add_parser("status", help="exit 0 only if the mount answers, the store is reachable and the "
                                       "cache writable (liveness probes)")
    st.add_argument("mountpoint")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("cache", help="cache admin: ls, verify, gc --to SIZE, pin KEY, unpin KEY")
    c.add_argument("action", choices=["ls", "verify", "gc", "pin", "unpin"])
    c.add_argument("key", nargs="?", help="for pin/unpin: a key prefix, as `cache ls` shows it")
    c.add_argument("--cache-dir", help="the cache dir (default: the daemon's default)")
    c.add_argument("--to", help="for gc: evict least recently used extents down to this size")
    c.add_argument("--source", help="for pin/unpin: the source, when the cache holds several")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_cache)

    d = sub.add_parser("du", help="logical, unique, cached and still-to-fetch bytes of files on a mount")
    d.add_argument("paths", nargs="+", metavar="PATH")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_du)

    s = sub.add_parser("stats", help="print the counters of a mount")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)
    return p


#: mount(8) options that concern mount(8), systemd or fstab, not modelfs (the mount is always ro, nodev, nosuid).
_MOUNT_IGNORED = {"rw", "ro", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
                  "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime", "sync",
                  "async", "owner", "group"}
_MOUNT_FLAGS = {"config": "--config", "cache_dir": "--cache-dir", "endpoint_url": "--endpoint-url",
                "log_level": "--log-level", "log_file": "--log-file"}


def cmd_cache(args: argparse.Namespace) -> int:
    """Cache administration: ls, verify, gc, pin, unpin (on a cache dir, running daemon or not)."""
    from modelfs.config import Config, parse_size
    from modelfs.service import admin

    cache_dir = os.path.abspath(args.cache_dir or Config().cache.dir)
    if not os.path.isdir(cache_dir):
        raise ModelfsError(f"cache dir {cache_dir} does not exist")
    if args.action == "ls":
        models = admin.list_models(cache_dir)
        print(f"{'cached':>11} {'size':>11}  pin  source  key")
        for mdl in models:
            pin = "yes" if mdl.pinned else "   "
            print(f"{human(mdl.cached):>11} {human(mdl.size):>11}  {pin}  {mdl.source}  {mdl.key}")
        print(f"{human(admin.total_bytes(cache_dir)):>11} {'':>11}       total in cache files")
        return 0
    if args.action == "verify":
        from tqdm import tqdm

        with tqdm(total=admin.total_bytes(cache_dir), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="verify", disable=args.quiet) as bar:
            checked, bad = admin.verify(cache_dir, bar.update)
        for where in bad:
            print(f"modelfs: corrupt extent of version {where}", file=sys.stderr)
        print(f"modelfs: {checked} extents checked, {len(bad)} corrupt (dropped, or reported if a daemon runs; "
              "refetched when read)")
        return 1 if bad else 0
    if args.action == "gc":
        if not args.to:
            raise ModelfsError("cache gc needs --to SIZE (e.g. --to 100GiB, or 0 for everything not pinned)")
        before, after = admin.gc(cache_dir, int(parse_size(args.to, "--to")))
        print(f"modelfs: cache {human(before)} -> {human(after)} (pinned models kept)")
        return 0
    if not args.key:
        raise ModelfsError(f"cache {args.action} needs a KEY prefix (see `modelfs cache ls`)")
    pins = admin.load_pins(cache_dir)
    source = args.source
    if source is None:
        sources = {m.source for m in admin.list_models(cache_dir)}
        if len(sources) != 1:
            raise ModelfsError(f"cache holds {len(sources)} sources: name one with --source (see `cache ls`)")
        source = sources.pop()
    keys = pins.setdefault(source, [])
    if args.action == "pin":
        keys.append(args.key)
    elif args.key in keys:
        keys.remove(args.key)
    else:
        raise ModelfsError(f"{args.key!r} is not pinned for {source}")
    admin.save_pins(cache_dir, pins)
    print(f"modelfs: {'pinned' if args.action == 'pin' else 'unpinned'} {source} {args.key} "
          "(a running daemon applies it at its next start)")
    return 0


def mount_helper(argv: list[str] | None = None) -> int:
    """`mount.modelfs SOURCE DIR [-o opts]`: what `mount -t modelfs` and fstab lines run.

    Options: config=FILE, cache_dir=DIR, endpoint_url=URL, log_level=, log_file=, allow_other, and any
    setting as section.key=value; mount(8)'s generic ones (_netdev, nofail, noauto, ...) are ignored.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    opts: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            opts += next(it, "").split(",")
        elif arg.startswith("-o"):
            opts += arg[2:].split(",")
        elif arg in ("-n", "-s", "-f", "-v", "-r", "-w"):  # no mtab, sloppy, fake, verbose, ro, rw
            continue
        else:
            positional.append(arg)
    if len(positional) != 2:
        print("modelfs: error: usage: mount.modelfs SOURCE MOUNTPOINT [-o options]", file=sys.stderr)
        return 2
    args = ["mount", *positional]
    for opt in filter(None, (o.strip() for o in opts)):
        key, sep, value = opt.partition("=")
        if key in _MOUNT_IGNORED or key.startswith(("x-systemd.", "x-", "comment")):
            continue
        if key == "allow_other" and not sep:
            args.append("--allow-other")
        elif key in _MOUNT_FLAGS and sep:
            args += [_MOUNT_FLAGS[key], value]
        elif "." in key and sep:
            args += ["-o", f"{key}={value}"]
        else:
            print(f"modelfs: error: unknown mount option {opt!r}", file=sys.stderr)
            return 1
    return main(args)


def cmd_status(args: argparse.Namespace) -> int:
    """For liveness probes: exit 0 only if the mount answers, the store is reachable and the cache writable."""
    try:
        os.statvfs(args.mountpoint)
        health = json.loads(os.getxattr(args.mountpoint, xattrs.HEALTH))
    except OSError as e:
        print(f"modelfs: {args.mountpoint}: mount does not answer ({e.strerror})")
        return 1
    checks = {"mount answers": True, "store reachable": bool(health["store_reachable"]),
              "cache writable": bool(health["cache_writable"])}
    for name, ok in checks.items():
        print(f"{name:16} {'ok' if ok else 'FAILED'}")
    if health.get("cache_storage"):
        print(f"cache storage    {health['cache_storage']}")
    if health.get("problem"):
        print(f"problem          {health['problem']}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except ModelfsError as e:
        print(f"modelfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
