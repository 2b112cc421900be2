"""Bad input to `modelfs mount`: config, CLI, URLs, store, mountpoint and cache dir.

Every case must exit non-zero with exactly one stderr line, `modelfs: error: ...`, that names the
problem; leave nothing mounted and no daemon holding the cache; and change nothing under the cache's
`files/` and `index/`. The cache the failing mounts are pointed at is a warm one (a real S3 mount
that read a file), copied per test, so "nothing changed" is checked against a real version file (its
bytes, its size and which of its ranges hold data) and a real LMDB index with listings in it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfs.service.mount import is_mounted
from tests.conftest import BUCKET, Checkpoint, Mount, cli, requires_fuse
from tests.support.seaweed import SeaweedServer

pytestmark = [requires_fuse, pytest.mark.mount]

#: Generous bound for one failing `modelfs mount` (the unreachable cases run a 3 s deadline).
CLI_TIMEOUT = 60


# -- helpers ---------------------------------------------------------------------------------------


#: LMDB's lock file is its reader table (pids and transaction ids of the processes that opened the
#: index), rewritten by every open, read-only ones included: runtime state, not cache content. Only its
#: presence is compared.
RUNTIME_FILES = {"index/lock.mdb"}


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """[(start, end)] of the ranges of a (sparse) file that hold data: a punched-out extent shows here even
    where its bytes were zeros."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def snapshot(cache_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file (and "dir" for every directory) under files/ and index/; a
    version file under files/ also with its data ranges (what is punched out, what is written)."""
    out: dict[str, str] = {}
    for sub in ("files", "index"):
        root = cache_dir / sub
        if not root.exists():
            continue
        out[sub] = "dir"
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(cache_dir).as_posix()
            if p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "present" if rel in RUNTIME_FILES else hashlib.sha256(p.read_bytes()).hexdigest()
                if sub == "files":
                    out[rel] += f" data={data_ranges(p)}"
    return out


def _kill_daemon_of(mountpoint: Path) -> None:
    """Lazily unmount a mount a test made by mistake and kill its daemon by the pid it reports."""
    pid = 0
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.getxattr(mountpoint, "user.modelfs.pid"))
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
    deadline = time.monotonic() + 10
    while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, one stderr line starting `modelfs: error:` that contains every needle."""
    err = r.stderr.strip()
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{r.stderr}"
    assert err.startswith("modelfs: error:"), err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    return err


def assert_cache_unlocked(cache_dir: Path) -> None:
    """No daemon is left holding the cache dir's lock."""
    lock = cache_dir / "lock"
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a daemon still holds it
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def dead_endpoint() -> str:
    """http://127.0.0.1:PORT where nothing listens (the port was just free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedServer, s3_checkpoint: str,
               checkpoint: Checkpoint) -> Path:
    """A cache dir after a real S3 mount that listed the tree and read one file fully, then unmounted."""
    base = tmp_path_factory.mktemp("warm")
    mnt, cache = base / "mnt", base / "cache"
    mnt.mkdir()
    r = cli("mount", s3_checkpoint, str(mnt), "--cache-dir", str(cache), env=seaweed.env(), timeout=CLI_TIMEOUT)
    try:
        assert r.returncode == 0, r.stderr
        rel = checkpoint.torch_file
        assert (mnt / rel).read_bytes() == (checkpoint.root / rel).read_bytes()
        r = cli("umount", str(mnt), timeout=CLI_TIMEOUT)
        assert r.returncode == 0, r.stderr
    finally:
        if is_mounted(str(mnt)):
            _kill_daemon_of(mnt)
    snap = snapshot(cache)
    assert "index/data.mdb" in snap and any(k.startswith("files/") and v != "dir" for k, v in snap.items()), snap
    return cache


@pytest.fixture
def cache(warm_cache: Path, tmp_path: Path) -> Path:
    """This test's own copy of the warm cache."""
    dst = tmp_path / "cache"
    shutil.copytree(warm_cache, dst, symlinks=True)
    return dst


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def env(seaweed: SeaweedServer) -> dict[str, str]:
    return seaweed.env()


@pytest.fixture
def bad_mount(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """bad_mount(*mount_args, mountpoint=, cache_dir=, env=, needles=) -> the error line.

    Runs `modelfs mount *mount_args` and checks the whole contract of a refused mount. Any mount it made
    anyway (a bug) is unmounted and its daemon killed at teardown.
    """
    tried: list[Path] = []

    def run(*args: str, mountpoint: Path, cache_dir: Path | None, env: dict[str, str] | None = None,
            needles: tuple[str, ...] = ()) -> str:
        was_mounted = is_mounted(str(mountpoint))
        if not was_mounted:
            tried.append(mountpoint)
        before = snapshot(cache_dir) if cache_dir is not None else {}
        r = cli("mount", *args, env=env, timeout=CLI_TIMEOUT)
        err = assert_one_line_error(r, *needles)
        assert is_mounted(str(mountpoint)) == was_mounted, f"{mountpoint} mount state changed: {err}"
        if cache_dir is not None:
            assert snapshot(cache_dir) == before, f"cache changed by a refused mount: {err}"
            assert_cache_unlocked(cache_dir)
        return err

    yield run
    for path in tried:
        if is_mounted(str(path)):
            _kill_daemon_of(path)


# -- config: unknown keys, wrong types, invalid TOML -----------------------------------------------


TOML_CASES = {
    "unknown-key": ("[cache]\nbogus = 1\n", ["unknown key 'cache.bogus'"]),
    "unknown-section": ("[cachee]\ndir = '/x'\n", ["unknown key 'cachee'"]),
    "unknown-top-level": ("sorce = 's3://models/x'\n", ["unknown key 'sorce'"]),
    "extent-size-bool": ("[cache]\nextent_size = true\n", ["cache.extent_size"]),
    "concurrency-string": ("[fetch]\nconcurrency = \"many\"\n", ["fetch.concurrency"]),
    "endpoint-not-string": ("[s3]\nendpoint_url = 5\n", ["s3.endpoint_url"]),
    "patterns-not-strings": ("[prefetch]\npatterns = [1, 2]\n", ["prefetch.patterns"]),
    "section-not-table": ("cache = 5\n", ["'cache'", "table"]),
    "invalid-toml": ("[cache\nextent_size = \n", ["not valid TOML"]),
    "invalid-toml-value": ("[fetch]\nconcurrency = 1 2\n", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", TOML_CASES, ids=list(TOML_CASES))
def test_bad_config_file(case: str, s3_checkpoint: str, env: dict[str, str], cache: Path, mnt: Path,
                         tmp_path: Path, bad_mount: Callable[..., str]) -> None:
    text, needles = TOML_CASES[case]
    cfg = tmp_path / "modelfs.toml"
    cfg.write_text(text)
    err = bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache), "--config", str(cfg),
                    mountpoint=mnt, cache_dir=cache, env=env, needles=tuple(needles))
    if "TOML" in needles[0]:
        assert str(cfg) in err


def test_missing_config_file(s3_checkpoint: str, env: dict[str, str], cache: Path, mnt: Path, tmp_path: Path,
                             bad_mount: Callable[..., str]) -> None:
    missing = tmp_path / "nope.toml"
    bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache), "--config", str(missing),
              mountpoint=mnt, cache_dir=cache, env=env, needles=("not found", str(missing)))


OPTION_CASES = {
    "unknown-key": (["-o", "fetch.bogus=1"], ["unknown key 'fetch.bogus'"]),
    "unknown-section": (["-o", "nosuch.key=1"], ["unknown key 'nosuch'"]),
    "unknown-top-level": (["-o", "bogus=1"], ["unknown key 'bogus'"]),
    "concurrency-many": (["-o", "fetch.concurrency=many"], ["fetch.concurrency", "many"]),
    "deadline-soon": (["-o", "fetch.deadline=soon"], ["fetch.deadline", "soon"]),
    "allow-other-maybe": (["-o", "mount.allow_other=maybe"], ["mount.allow_other", "maybe"]),
    "file-mode-not-octal": (["-o", "mount.file_mode=rw"], ["mount.file_mode"]),
    "extent-size-unit": (["-o", "cache.extent_size=8 parsecs"], ["cache.extent_size"]),
    "extent-size-flag": (["--extent-size", "big"], ["cache.extent_size", "big"]),
    "extent-size-range": (["--extent-size", "1000"], ["cache.extent_size"]),
    "concurrency-zero": (["-o", "fetch.concurrency=0"], ["fetch.concurrency"]),
    "log-level": (["--log-level", "LOUD"], ["log.level", "LOUD"]),
    "addressing-style": (["-o", "s3.addressing_style=sideways"], ["s3.addressing_style", "sideways"]),
    "no-equals": (["-o", "fetch.concurrency"], ["SECTION.KEY=VALUE", "fetch.concurrency"]),
    "section-as-value": (["-o", "cache=1"], ["'cache'", "table"]),
}


@pytest.mark.parametrize("case", OPTION_CASES, ids=list(OPTION_CASES))
def test_bad_option(case: str, s3_checkpoint: str, env: dict[str, str], cache: Path, mnt: Path,
                    bad_mount: Callable[..., str]) -> None:
    args, needles = OPTION_CASES[case]
    bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache), *args,
              mountpoint=mnt, cache_dir=cache, env=env, needles=tuple(needles))


def test_unknown_cli_flag(s3_checkpoint: str, env: dict[str, str], cache: Path, mnt: Path,
                          bad_mount: Callable[..., str]) -> None:
    bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache), "--cache-size", "1GiB",
              mountpoint=mnt, cache_dir=cache, env=env, needles=("--cache-size",))


def test_no_source_or_mountpoint(cache: Path, mnt: Path, bad_mount: Callable[..., str]) -> None:
    bad_mount("--cache-dir", str(cache), mountpoint=mnt, cache_dir=cache, needles=("no source",))
    bad_mount(str(mnt), "--cache-dir", str(cache), mountpoint=mnt, cache_dir=cache, needles=("no mountpoint",))


# -- bad source URLs and endpoints -----------------------------------------------------------------


@pytest.mark.parametrize(("source", "needles"), [
    ("s3://", ("missing bucket",)),
    ("s3:///ckpts", ("missing bucket",)),
    ("s3://a/ckpts", ("invalid bucket name 'a'",)),
    ("s3://Bad_Bucket!/ckpts", ("invalid bucket name 'Bad_Bucket!'",)),
    ("http://example/x", ("unsupported URL scheme", "http://example/x")),
    ("gs://models/ckpts", ("unsupported URL scheme", "gs://models/ckpts")),
], ids=["no-bucket", "empty-bucket", "short-bucket", "bad-chars", "http", "gs"])
def test_bad_source_url(source: str, needles: tuple[str, ...], env: dict[str, str], cache: Path, mnt: Path,
                        bad_mount: Callable[..., str]) -> None:
    bad_mount(source, str(mnt), "--cache-dir", str(cache), mountpoint=mnt, cache_dir=cache, env=env,
              needles=needles)


@pytest.mark.parametrize("prefix", ["", "file://"], ids=["path", "file-url"])
def test_missing_local_source(prefix: str, tmp_path: Path, cache: Path, mnt: Path,
                              bad_mount: Callable[..., str]) -> None:
    missing = tmp_path / "no-such-source"
    bad_mount(prefix + str(missing), str(mnt), "--cache-dir", str(cache), mountpoint=mnt, cache_dir=cache,
              needles=(str(missing), "not a directory"))


@pytest.mark.parametrize("url", ["not a url", "ftp//127.0.0.1:1"], ids=["spaces", "no-scheme"])
def test_bad_endpoint_url(url: str, s3_checkpoint: str, env: dict[str, str], cache: Path, mnt: Path,
                          bad_mount: Callable[..., str]) -> None:
    bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache), "-o", f"s3.endpoint_url={url}",
              mountpoint=mnt, cache_dir=cache, env=env, needles=("endpoint", url))


# -- the store: missing bucket, wrong credentials, unreachable -------------------------------------


def test_missing_bucket(env: dict[str, str], cache: Path, mnt: Path, bad_mount: Callable[..., str]) -> None:
    bad_mount("s3://no-such-bucket-xyz/ckpts", str(mnt), "--cache-dir", str(cache),
              mountpoint=mnt, cache_dir=cache, env=env, needles=("no-such-bucket-xyz", "does not exist"))


@pytest.mark.parametrize("var", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials(var: str, s3_checkpoint: str, env: dict[str, str], cache: Path, mnt: Path,
                           bad_mount: Callable[..., str]) -> None:
    """SeaweedFS runs with an identity config (tests.support.seaweed), so it checks signatures."""
    wrong = {**env, var: "not-the-" + env[var]}
    err = bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache), mountpoint=mnt, cache_dir=cache,
                    env=wrong, needles=("access denied", "credentials", BUCKET))
    assert wrong[var] not in err and env["AWS_SECRET_ACCESS_KEY"] not in err


@pytest.mark.parametrize("warm", [False, True], ids=["fresh-cache", "warm-cache-other-endpoint"])
def test_unreachable_endpoint(warm: bool, s3_checkpoint: str, env: dict[str, str], cache: Path, mnt: Path,
                              tmp_path: Path, bad_mount: Callable[..., str]) -> None:
    """Nothing listens at the endpoint and the cache holds no listing of this source (same bucket and
    prefix, another endpoint): no offline mode, a bounded failure that names the endpoint."""
    endpoint = dead_endpoint()
    cache_dir = cache if warm else tmp_path / "fresh-cache"
    err = bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache_dir), "-o", f"s3.endpoint_url={endpoint}",
                    "-o", "fetch.deadline=3", mountpoint=mnt, cache_dir=cache_dir, env=env,
                    needles=(endpoint,))
    assert "cannot reach" in err or "did not answer" in err, err
    if not warm:
        assert snapshot(cache_dir) == {}, "a refused mount created files/ or index/ in a fresh cache dir"


def test_refused_endpoint_without_retries(s3_checkpoint: str, env: dict[str, str], mnt: Path, tmp_path: Path,
                                          bad_mount: Callable[..., str]) -> None:
    """Connection refused and no retries left before the deadline: still 'cannot reach' the endpoint."""
    endpoint = dead_endpoint()
    cache_dir = tmp_path / "fresh-cache"
    err = bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache_dir), "-o", f"s3.endpoint_url={endpoint}",
                    "-o", "s3.max_attempts=1", "-o", "fetch.deadline=3", mountpoint=mnt, cache_dir=cache_dir,
                    env=env, needles=(endpoint,))
    assert "cannot reach" in err, err


# -- the mountpoint --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "regular-file", "not-empty"])
def test_bad_mountpoint(kind: str, s3_checkpoint: str, env: dict[str, str], cache: Path, tmp_path: Path,
                        bad_mount: Callable[..., str]) -> None:
    path = tmp_path / "mp"
    if kind == "regular-file":
        path.write_text("x")
    elif kind == "not-empty":
        path.mkdir()
        (path / "keep.txt").write_text("x")
    needles = {"missing": "does not exist", "regular-file": "not a directory", "not-empty": "not empty"}
    bad_mount(s3_checkpoint, str(path), "--cache-dir", str(cache), mountpoint=path, cache_dir=cache, env=env,
              needles=(str(path), needles[kind]))
    if kind == "regular-file":
        assert path.read_text() == "x"
    elif kind == "not-empty":
        assert os.listdir(path) == ["keep.txt"]


def test_mountpoint_already_mounted(checkpoint: Checkpoint, s3_checkpoint: str, env: dict[str, str], cache: Path,
                                    mounter: Callable[..., Mount], bad_mount: Callable[..., str]) -> None:
    live = mounter(str(checkpoint.root))
    before = sorted(os.listdir(live.path))
    bad_mount(s3_checkpoint, str(live.path), "--cache-dir", str(cache), mountpoint=live.path, cache_dir=cache,
              env=env, needles=(str(live.path), "already mounted"))
    assert sorted(os.listdir(live.path)) == before  # the first mount still serves
    rel = checkpoint.torch_file
    assert (live.path / rel).read_bytes()[:4096] == (checkpoint.root / rel).read_bytes()[:4096]


def test_mountpoint_is_another_filesystem(s3_checkpoint: str, env: dict[str, str], cache: Path,
                                          ro_tmpfs: Path, bad_mount: Callable[..., str]) -> None:
    bad_mount(s3_checkpoint, str(ro_tmpfs), "--cache-dir", str(cache), mountpoint=ro_tmpfs, cache_dir=cache,
              env=env, needles=(str(ro_tmpfs), "already mounted"))


# -- the cache dir ---------------------------------------------------------------------------------


@pytest.fixture
def ro_tmpfs(tmpfs: Callable[..., Path]) -> Path:
    """An empty read-only tmpfs."""
    return tmpfs("ro-tmpfs", "ro,size=1m")


@pytest.fixture
def ro_warm_cache(cache: Path, tmp_path: Path) -> Iterator[Path]:
    """This test's copy of the warm cache, bind-mounted read-only elsewhere."""
    path = tmp_path / "ro-cache"
    path.mkdir()
    subprocess.run(["mount", "--bind", str(cache), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        with pytest.raises(OSError) as e:
            (path / "probe").write_text("x")
        assert e.value.errno == errno.EROFS
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("where", ["below-a-file", "is-a-file"])
def test_cache_dir_not_a_directory(where: str, s3_checkpoint: str, env: dict[str, str], mnt: Path,
                                   tmp_path: Path, bad_mount: Callable[..., str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    cache_dir = afile / "cache" if where == "below-a-file" else afile
    bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache_dir), mountpoint=mnt, cache_dir=None, env=env,
              needles=(str(cache_dir), "not writable" if where == "below-a-file" else "is not a directory"))
    assert afile.read_text() == "x"


@pytest.mark.parametrize("log_elsewhere", [False, True], ids=["log-in-cache", "log-elsewhere"])
@pytest.mark.parametrize("sub", ["", "cache"], ids=["tmpfs-root", "below-tmpfs"])
def test_cache_dir_on_read_only_tmpfs(sub: str, log_elsewhere: bool, s3_checkpoint: str, env: dict[str, str],
                                      mnt: Path, tmp_path: Path, ro_tmpfs: Path,
                                      bad_mount: Callable[..., str]) -> None:
    """With --log-file elsewhere the CLI gets past its own checks and the daemon's cache lock refuses."""
    cache_dir = ro_tmpfs / sub if sub else ro_tmpfs
    extra = ["--log-file", str(tmp_path / "modelfs.log")] if log_elsewhere else []
    bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(cache_dir), *extra, mountpoint=mnt, cache_dir=cache_dir,
              env=env, needles=(str(cache_dir), "not writable"))
    assert os.listdir(ro_tmpfs) == []


@pytest.mark.parametrize("log_elsewhere", [False, True], ids=["log-in-cache", "log-elsewhere"])
def test_warm_cache_dir_read_only(log_elsewhere: bool, s3_checkpoint: str, env: dict[str, str], mnt: Path,
                                  tmp_path: Path, ro_warm_cache: Path, bad_mount: Callable[..., str]) -> None:
    extra = ["--log-file", str(tmp_path / "modelfs.log")] if log_elsewhere else []
    bad_mount(s3_checkpoint, str(mnt), "--cache-dir", str(ro_warm_cache), *extra, mountpoint=mnt,
              cache_dir=ro_warm_cache, env=env, needles=(str(ro_warm_cache), "not writable"))


def test_cache_dir_in_use(s3_checkpoint: str, env: dict[str, str], cache: Path, tmp_path: Path,
                          mounter: Callable[..., Mount], bad_mount: Callable[..., str]) -> None:
    """A second daemon on a cache dir a live mount holds is refused, naming the holder."""
    live = mounter(s3_checkpoint, env=env, cache_dir=cache)
    second = tmp_path / "second"
    second.mkdir()
    before = snapshot(cache)
    r = cli("mount", s3_checkpoint, str(second), "--cache-dir", str(cache), env=env, timeout=CLI_TIMEOUT)
    try:
        assert_one_line_error(r, str(cache), "in use", f"pid {live.pid}")
        assert not is_mounted(str(second))
        assert snapshot(cache) == before
        assert os.listdir(live.path)  # the live mount still serves
    finally:
        if is_mounted(str(second)):
            _kill_daemon_of(second)
