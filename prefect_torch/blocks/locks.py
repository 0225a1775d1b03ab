"""Leased locks, so identical cards started at once compute once.

Coarse cards run in Prefect transactions at ``SERIALIZABLE`` isolation: a run
takes the lock of the card's cache key, checks the result storage, computes
only on a miss, writes the result and releases the lock. A second run of the
same card (another process, thread or machine sharing the storage) waits on the
lock and then reads the first one's result: the card ran once.

Why not Prefect's ``FileSystemLockManager``: in Prefect 3.8 ``ResultStore``
acquires locks without a ``hold_timeout``, so its locks never expire, and one
left by a process killed with SIGKILL blocks every later run of that card for
ever. A fixed expiry does not fit training either: too short and a long training
run loses its lock while it is still working (a second run then trains too, and
the first one's commit is refused); too long and a crash blocks others for hours.

So a lock here is a *lease*: a small record (holder, expiry) next to the
results, that its holder renews every ``hold_seconds / 3`` from a background
thread for as long as it works, however long that is. A live holder never
loses it; a dead one stops renewing, and its lease expires at most
``hold_seconds`` after its last renewal, when a waiting run takes it over.
The default hold of 60 s bounds that wait to a minute, and is long enough
that a holder whose process is stalled for a while (a long call that keeps the
GIL, heavy swapping, a loaded CI machine) is not mistaken for a dead one. Set
``PREFECT_TORCH_LOCK_HOLD_SECONDS`` to change it (tests use a few seconds).

A holder that dies on the *same host* is not waited for at all. Each lease
records where its holder runs: the host (host name, the kernel's boot id from
``/proc/sys/kernel/random/boot_id`` and the PID namespace, so another machine,
a reboot or another container never counts as the same host), the pid and the
process's start time (field 22 of ``/proc/<pid>/stat``, so a pid the kernel
handed to another process since is not taken for the holder). A waiter on the
same host whose holder's process is gone (or a zombie, or a pid now running
another process) takes the lease over at once, with the same compare-and-swap
as an expired one: two waiters never both take it. Leases from other hosts,
leases without these fields (written by older versions) and hosts without
``/proc`` still expire by time only.

Expiry compares wall clocks: processes sharing a lock folder on several
machines need clocks in sync to well under ``hold_seconds`` (NTP does that).

The lock records live in a ``locks`` folder next to the ``results`` folder of
the storage. A local folder serialises its compare-and-swap updates with
``fcntl.flock`` on a guard file per lock (short critical sections, released by
the kernel even when a process dies in one). That needs a filesystem whose
``flock`` works across the processes sharing it (local disks do; NFS v4 does).
Object storage (``s3://``) keeps its leases in a local folder per machine
(see ``lock_manager``), so the same-host takeover applies there too.

This module must not import torch: Prefect imports ``prefect_torch.blocks`` on
every block lookup.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from prefect.locking.protocol import LockManager

from prefect_torch.errors import ConfigError, StorageError

logger = logging.getLogger("prefect_torch.locks")

HOLD_SECONDS_ENV = "PREFECT_TORCH_LOCK_HOLD_SECONDS"
DEFAULT_HOLD_SECONDS = 60.0
# How often a waiting run looks at a lock it waits for.
_POLL_SECONDS = 0.05
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,150}")


def hold_seconds() -> float:
    """The lease length: ``PREFECT_TORCH_LOCK_HOLD_SECONDS``, else 60 seconds."""
    raw = os.environ.get(HOLD_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_HOLD_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0.5 <= value <= 86_400):
        raise ConfigError(
            f"{HOLD_SECONDS_ENV} must be a number of seconds between 0.5 and 86400. "
            f"You set {raw!r}. It bounds how long a crashed run's lock blocks the next "
            f"run; unset it for the default of {DEFAULT_HOLD_SECONDS:g} s."
        )
    return value


@dataclass(frozen=True)
class Lease:
    """What a lock record says: who holds it (Prefect's holder id, and the host and
    process it runs in), until when, and a nonce that changes with every write
    (the compare-and-swap token).

    ``host_id`` and ``started`` identify the holder's process beyond its pid:
    the host's boot id (plus PID namespace) and the process's start time in
    clock ticks since boot. Empty / 0 in leases of older versions, and on hosts
    without ``/proc``: such a lease expires by time only.
    """

    holder: str
    expires: float
    nonce: str
    host: str = ""
    pid: int = 0
    host_id: str = ""
    started: int = 0

    @property
    def expired(self) -> bool:
        return self.expires <= time.time()

    @property
    def holder_gone(self) -> bool:
        """The holder ran on this host and its process no longer exists (or is a
        zombie, or its pid now belongs to another process). False whenever that
        cannot be known for sure: another host, or a lease without the fields."""
        if not (self.host_id and self.started > 0 and self.pid > 0):
            return False
        here = _host_identity()
        if not here or (self.host, self.host_id) != (socket.gethostname(), here):
            return False
        running = _process_start(self.pid)
        return running is not None and running != self.started

    @property
    def dead(self) -> bool:
        """Free to take over: expired, or its holder died on this host."""
        return self.expired or self.holder_gone

    @property
    def where(self) -> str:
        return f"{self.holder} (process {self.pid} on {self.host})"

    def encode(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "expires": self.expires, "nonce": self.nonce, "host": self.host, "pid": self.pid,
             "host_id": self.host_id, "started": self.started}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Optional["Lease"]:
        try:
            record = json.loads(data)
            return cls(
                holder=str(record["holder"]), expires=float(record["expires"]), nonce=str(record["nonce"]),
                host=str(record.get("host", "")), pid=int(record.get("pid", 0)),
                host_id=str(record.get("host_id", "")), started=int(record.get("started", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # half-written by a process that died: treated as expired


def _new_lease(holder: str, hold: float) -> Lease:
    pid = os.getpid()
    return Lease(holder=holder, expires=time.time() + hold, nonce=uuid.uuid4().hex,
                 host=socket.gethostname(), pid=pid, host_id=_host_identity(), started=_own_start(pid))


_host: Optional[str] = None
_own: tuple[int, int] = (0, 0)


def _host_identity() -> str:
    """This host's boot id and PID namespace ("" when /proc cannot tell them):
    equal only for processes that share one kernel boot and one pid space, so a
    pid recorded by one of them means the same process to the other."""
    global _host
    if _host is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            namespace = os.readlink("/proc/self/ns/pid")
            _host = f"{boot}/{namespace}" if boot and namespace else ""
        except OSError:
            _host = ""
    return _host


def _process_start(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of
    /proc/<pid>/stat); 0 when it does not exist or is a zombie (it holds nothing);
    None when it exists but /proc does not show it (``hidepid``): unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # signal 0 checks existence only
        except ProcessLookupError:
            return 0
        except OSError:
            return None  # exists, another user's
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        state, started = fields[0], int(fields[19])  # fields 3 and 22
    except (IndexError, ValueError):
        return None
    return 0 if state in (b"Z", b"X") else started


def _own_start(pid: int) -> int:
    global _own
    if _own[0] != pid:  # computed once per process (a fork gets its own)
        _own = (pid, (_process_start(pid) or 0) if _host_identity() else 0)
    return _own[1]


class _LeaseFolder:
    """Lock records in a local folder; every update is a compare-and-swap under a
    per-lock ``flock``, so two processes never both believe they took a lease."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LeaseFolder) and other.folder == self.folder

    def __hash__(self) -> int:
        return hash(self.folder)

    def __str__(self) -> str:
        return str(self.folder)

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.lock", self.folder / f".{name}.guard"

    @contextmanager
    def _guarded(self, name: str) -> Iterator[Path]:
        path, guard = self._paths(name)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise StorageError(
                f"Cannot use the lock folder {self.folder}: {exc}. Check that it is "
                "writable by every process that runs these flows."
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # releases the flock

    def read(self, name: str) -> Optional[Lease]:
        path, _ = self._paths(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return Lease.decode(data) or Lease(holder="<unreadable>", expires=0.0, nonce="")

    def swap(self, name: str, expected: Optional[Lease], new: Optional[Lease], *, if_expired: bool = False) -> bool:
        """Replace the record by ``new`` (delete it if None) if it still is
        ``expected`` (None: absent) or, with ``if_expired``, is dead (expired, or
        its holder's process is gone from this host), checked under the guard."""
        with self._guarded(name) as path:
            current = self.read(name)
            if if_expired:
                ok = current is None or current.dead
            else:
                ok = (current is None and expected is None) or (
                    current is not None and expected is not None and current.nonce == expected.nonce
                )
            if not ok:
                return False
            if new is None:
                path.unlink(missing_ok=True)
            else:
                temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                temporary.write_bytes(new.encode())
                os.replace(temporary, path)
            return True


class LeaseLockManager(LockManager):
    """Prefect lock manager of renewable leases kept next to the results.

    Plug it into a cache policy with
    ``policy.configure(isolation_level="SERIALIZABLE", lock_manager=manager)``;
    ``prefect_torch.tasks._common.persisted_in`` does that for the coarse cards.

    Args:
        folder: Folder of the lock records (``locks`` next to the results).
        hold: Lease length in seconds; default ``hold_seconds()`` at each acquire.
    """

    def __init__(self, folder: str | Path, hold: float | None = None):
        self._store = _LeaseFolder(Path(folder).expanduser().resolve())
        self._hold = hold

    # The manager is configuration only (the leases it holds live in a
    # process-wide table), so copies of a cache policy share it.
    def __deepcopy__(self, memo: dict) -> "LeaseLockManager":
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeaseLockManager) and (other._store, other._hold) == (self._store, self._hold)

    def __hash__(self) -> int:
        return hash((self._store, self._hold))

    def __repr__(self) -> str:
        return f"LeaseLockManager({str(self._store)!r}, hold={self._hold})"

    @property
    def folder(self) -> Path:
        return self._store.folder

    # -- Prefect's LockManager protocol --------------------------------------------

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: Optional[float] = None,
        hold_timeout: Optional[float] = None,
    ) -> bool:
        """Take the lease of ``key``, waiting while a live holder has it.

        Waits without limit by default (a live holder may train for hours; it
        renews its lease meanwhile). A dead holder's lease is taken over at once
        when it ran on this host, else once it expires, at most ``hold`` seconds
        after the holder's last renewal.
        """
        name = _lock_name(key)
        hold = hold_timeout or self._hold or hold_seconds()
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        waited_on: Optional[str] = None
        started = time.monotonic()
        while True:
            current = self._store.read(name)
            lease = _new_lease(holder, hold)
            if current is not None and current.holder == holder and not current.expired:
                taken = self._store.swap(name, current, lease)  # re-entrant: renew our own
            elif current is None:
                taken = self._store.swap(name, None, lease)
            elif current.dead:
                taken = self._store.swap(name, current, lease, if_expired=True)
                if taken and current.expired:
                    _log("warning", f"Took over the lock of {key} from {current.where}: its lease expired "
                         f"{time.time() - current.expires:.1f} s ago, unrenewed (a crashed or killed run).")
                elif taken:
                    _log("warning", f"Took over the lock of {key} from {current.where}: that process no "
                         f"longer runs on this host (a crashed or killed run), so its lease was not waited out.")
            else:
                taken = False
                if waited_on != current.holder:
                    waited_on = current.holder
                    _log_waiting(key, current, hold)
            if taken:
                _leases.hold(self._store, name, lease, hold)
                if waited_on is not None:
                    _log("info", f"Got the lock of {key} after waiting {time.monotonic() - started:.1f} s.")
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: Optional[float] = None,
        hold_timeout: Optional[float] = None,
    ) -> bool:
        from prefect.utilities.asyncutils import run_sync_in_worker_thread

        return await run_sync_in_worker_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Give the lease of ``key`` back. One already taken over (this process
        stalled past its lease) is left to its new holder, with a warning."""
        name = _lock_name(key)
        lease = _leases.release(self._store, name)
        current = self._store.read(name)
        if current is not None and current.holder == holder:
            if self._store.swap(name, current, None):
                return
        if lease is not None:
            _log("warning", f"The lock of {key} was no longer held by {holder} when it was released: "
                 f"another run took it over after this one stopped renewing it. Raise "
                 f"{HOLD_SECONDS_ENV} if this process stalls for long stretches.")

    def is_locked(self, key: str) -> bool:
        current = self._store.read(_lock_name(key))
        return current is not None and not current.dead

    def is_lock_holder(self, key: str, holder: str) -> bool:
        current = self._store.read(_lock_name(key))
        return current is not None and not current.dead and current.holder == holder

    def wait_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        """Wait while a live holder has ``key`` (Prefect waits here before reading a result)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waited_on: Optional[str] = None
        while (current := self._store.read(_lock_name(key))) is not None and not current.dead:
            if waited_on != current.holder:
                waited_on = current.holder
                _log_waiting(key, current, self._hold or hold_seconds())
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        from prefect.utilities.asyncutils import run_sync_in_worker_thread

        return await run_sync_in_worker_thread(self.wait_for_lock, key, timeout)


class _HeldLeases:
    """The leases this process holds, renewed by one daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[_LeaseFolder, str], tuple[Lease, float]] = {}
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def hold(self, store: _LeaseFolder, name: str, lease: Lease, hold: float) -> None:
        with self._lock:
            self._held[(store, name)] = (lease, hold)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._renew_forever, name="prefect-torch-leases", daemon=True)
                self._thread.start()
        self._wake.set()

    def release(self, store: _LeaseFolder, name: str) -> Optional[Lease]:
        with self._lock:
            held = self._held.pop((store, name), None)
        return held[0] if held else None

    def _renew_forever(self) -> None:
        while True:
            with self._lock:
                held = list(self._held.items())
            for (store, name), (lease, hold) in held:
                if lease.expires - time.time() > 2 * hold / 3:
                    continue  # renewed less than a third of the lease ago
                renewed = _new_lease(lease.holder, hold)
                try:
                    ok = store.swap(name, lease, renewed)
                except Exception as exc:  # a flaky disk must not kill the renewer
                    _log("warning", f"Could not renew the lock {name} in {store}: {exc}")
                    continue
                with self._lock:
                    if (store, name) not in self._held:
                        continue  # released meanwhile
                    if ok:
                        self._held[(store, name)] = (renewed, hold)
                    else:
                        self._held.pop((store, name), None)
                if not ok:
                    _log("error", f"Lost the lock {name} in {store}: it expired before it was renewed "
                         f"and another run took it over. Raise {HOLD_SECONDS_ENV} if this process "
                         "stalls for long stretches.")
            with self._lock:
                holds = [hold for _, hold in self._held.values()]
            self._wake.clear()
            self._wake.wait(min(holds) / 6 if holds else 60.0)


_leases = _HeldLeases()


def _lock_name(key: str) -> str:
    """A file name for a cache key: the key itself when it is one already."""
    if _SAFE_NAME.fullmatch(key) and not key.startswith("."):
        return key
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:40]


def _log_waiting(key: str, holder: Lease, hold: float) -> None:
    # A run that sits still must say why, or it looks hung.
    _log("info", f"Waiting for the lock of {key}, held by {holder.where}: the same card is "
         f"computing there; this run reads its result when it is done. Should that process die, "
         f"its lock is taken over at once if it ran on this host, else when it expires, within "
         f"{hold:g} s ({HOLD_SECONDS_ENV}).")


def _log(level: str, message: str) -> None:
    # In a run, the run logger puts the line next to the task in the Prefect UI.
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        run_logger = get_run_logger()
    except MissingContextError:
        run_logger = logger
    getattr(run_logger, level)(message)


def lock_manager(storage=None) -> LeaseLockManager:
    """The lock manager for results kept in ``storage`` (default: default_storage()).

    A local storage keeps its locks in a ``locks`` folder next to its ``results``,
    so every process that shares the results shares the locks.

    For object storage (``s3://``) the locks are kept in a folder under this
    machine's Prefect home, one per storage location: runs on this machine
    compute a card once, but runs on *different machines* sharing a bucket are
    not serialised (each may compute the card; their results are identical and
    each write is a single atomic PUT, so nothing is corrupted, only work is
    repeated). Leases in the bucket itself, with conditional writes, would close
    that gap.
    """
    from prefect_torch.blocks.storage import default_storage

    storage = storage if storage is not None else default_storage()
    if storage.is_local:
        return LeaseLockManager(storage.url("locks"))
    from prefect.settings import get_current_settings

    where = hashlib.sha256(storage.url("").encode()).hexdigest()[:16]
    return LeaseLockManager(Path(get_current_settings().home) / "prefect-torch" / "locks" / where)


__all__ = ["LeaseLockManager", "Lease", "lock_manager", "hold_seconds", "HOLD_SECONDS_ENV", "DEFAULT_HOLD_SECONDS"]
