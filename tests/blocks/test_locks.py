"""Leased locks: a live holder keeps its lease past the hold time, a dead one loses
it after the hold time (at once when it died on this host), and the lease length
is validated."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefect_torch.blocks.locks import LeaseLockManager, hold_seconds, lock_manager
from prefect_torch.blocks.storage import TorchStorage
from prefect_torch.errors import ConfigError


def test_a_live_holder_keeps_its_lease_past_the_hold_time(tmp_path):
    locks = LeaseLockManager(tmp_path, hold=0.6)
    assert locks.acquire_lock("train-abc", "run-a")
    time.sleep(1.5)  # over twice the hold: only renewal keeps it
    assert locks.is_lock_holder("train-abc", "run-a")
    assert not LeaseLockManager(tmp_path, hold=0.6).acquire_lock("train-abc", "run-b", acquire_timeout=0.3)
    locks.release_lock("train-abc", "run-a")
    assert not locks.is_locked("train-abc") and not (tmp_path / "train-abc.lock").exists()


def test_a_waiter_gets_the_lock_when_the_holder_releases_it(tmp_path):
    locks = LeaseLockManager(tmp_path, hold=5)
    assert locks.acquire_lock("k", "run-a")
    threading.Timer(0.5, locks.release_lock, ("k", "run-a")).start()
    started = time.monotonic()
    assert LeaseLockManager(tmp_path, hold=5).acquire_lock("k", "run-b")
    assert 0.4 < time.monotonic() - started < 3
    assert locks.is_lock_holder("k", "run-b")
    locks.release_lock("k", "run-b")


def test_an_unrenewed_lease_expires_and_is_taken_over(tmp_path):
    # What a SIGKILLed holder leaves: a lease nobody renews.
    (tmp_path / "k.lock").write_text(json.dumps(
        {"holder": "dead", "expires": time.time() + 1.0, "nonce": "x", "host": "h", "pid": 1}))
    locks = LeaseLockManager(tmp_path, hold=1.0)
    assert locks.is_locked("k") and not locks.acquire_lock("k", "run-b", acquire_timeout=0.3)
    started = time.monotonic()
    assert locks.acquire_lock("k", "run-b")
    assert time.monotonic() - started < 1.5
    assert locks.is_lock_holder("k", "run-b") and not locks.is_lock_holder("k", "dead")
    locks.release_lock("k", "run-b")


def test_a_torn_lock_record_counts_as_expired(tmp_path):
    (tmp_path / "k.lock").write_bytes(b'{"holder": "de')
    locks = LeaseLockManager(tmp_path, hold=5)
    assert not locks.is_locked("k")
    assert locks.acquire_lock("k", "run-b", acquire_timeout=1)
    locks.release_lock("k", "run-b")


def test_keys_that_are_not_file_names_are_hashed(tmp_path):
    locks = LeaseLockManager(tmp_path, hold=5)
    assert locks.acquire_lock("/abs/path/../x", "run-a")
    assert [p.name for p in tmp_path.glob("*.lock")][0].startswith("key-")
    locks.release_lock("/abs/path/../x", "run-a")


def test_local_locks_live_next_to_the_results(tmp_path):
    storage = TorchStorage(basepath=str(tmp_path / "store"))
    assert lock_manager(storage).folder == tmp_path / "store" / "locks"


def test_object_storage_locks_are_local_leases_of_this_machine(tmp_path):
    # So a holder killed on this machine is taken over at once there too.
    from prefect.settings import PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_HOME: tmp_path / "home"}):
        locks = lock_manager(TorchStorage(basepath="s3://bucket/prefix"))
    assert isinstance(locks, LeaseLockManager) and locks.folder.is_relative_to(tmp_path / "home")


@pytest.mark.parametrize("value", ["0", "-3", "soon", "1e9", "nan"])
def test_a_bad_hold_time_is_refused_with_the_fix(monkeypatch, value):
    monkeypatch.setenv("PREFECT_TORCH_LOCK_HOLD_SECONDS", value)
    with pytest.raises(ConfigError, match="PREFECT_TORCH_LOCK_HOLD_SECONDS must be .* You set"):
        hold_seconds()


def test_the_hold_time_defaults_to_a_minute(monkeypatch):
    monkeypatch.delenv("PREFECT_TORCH_LOCK_HOLD_SECONDS", raising=False)
    assert hold_seconds() == 60.0
    monkeypatch.setenv("PREFECT_TORCH_LOCK_HOLD_SECONDS", "2.5")
    assert hold_seconds() == 2.5


# -- a holder that died on this host is not waited for ------------------------------

# A day-long lease: one the test cannot wait out within any of its timeouts.
HOLD_IN_SUBPROCESS = """
import sys, time
from prefect_torch.blocks.locks import LeaseLockManager
assert LeaseLockManager(sys.argv[1], hold=86_400).acquire_lock("k", "doomed-run")
print("holding", flush=True)
time.sleep(600)
"""


def this_host_lease(tmp_path, pid: int, started: int, *, expires_in: float = 600, host_id: str | None = None) -> None:
    """A lease as a process ``pid`` (started at ``started``) on this host would write it."""
    from prefect_torch.blocks.locks import _host_identity

    (tmp_path / "k.lock").write_text(json.dumps({
        "holder": "other-run", "expires": time.time() + expires_in, "nonce": "n", "host": socket.gethostname(),
        "pid": pid, "host_id": _host_identity() if host_id is None else host_id, "started": started,
    }))


def start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2:].split()[19])


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_lock_of_a_process_killed_on_this_host_is_taken_over_before_its_lease_expires(tmp_path, reaped):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_IN_SUBPROCESS, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        lease = json.loads((tmp_path / "k.lock").read_text())
        assert lease["pid"] == holder.pid and lease["started"] > 0
        locks = LeaseLockManager(tmp_path, hold=600)
        assert locks.is_locked("k") and not locks.acquire_lock("k", "run-b", acquire_timeout=0.3)

        os.kill(holder.pid, signal.SIGKILL)
        if reaped:
            holder.wait()  # else it stays a zombie until the end of the test
        # Acquired within 60 s of a lease with a day to run: taken over, not waited out.
        assert locks.acquire_lock("k", "run-b", acquire_timeout=60)
        assert locks.is_lock_holder("k", "run-b")
        locks.release_lock("k", "run-b")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize("where", ["another-boot", "another-host"])
def test_a_lease_from_another_host_is_waited_out(tmp_path, where):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a pid that no longer runs here
    this_host_lease(tmp_path, dead_pid, 12345, expires_in=86_400,
                    host_id="another-boot-id/pid:[1]" if where == "another-boot" else None)
    lease = json.loads((tmp_path / "k.lock").read_text())
    if where == "another-host":
        lease["host"] = "not-" + lease["host"]
        (tmp_path / "k.lock").write_text(json.dumps(lease))

    locks = LeaseLockManager(tmp_path, hold=5)
    # Its holder's pid means nothing here, so its day-long lease stands...
    assert locks.is_locked("k") and not locks.acquire_lock("k", "run-b", acquire_timeout=1)
    # ...until it runs out: the same lease, a second from its end, is waited for and taken.
    (tmp_path / "k.lock").write_text(json.dumps({**lease, "expires": time.time() + 1}))
    assert locks.is_locked("k") and locks.acquire_lock("k", "run-b", acquire_timeout=30)
    locks.release_lock("k", "run-b")


def test_a_pid_now_running_another_process_counts_as_dead(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        locks = LeaseLockManager(tmp_path, hold=5)
        # The recorded start time is the live process's own: that is the holder, alive.
        this_host_lease(tmp_path, other.pid, start_time(other.pid))
        assert not locks.acquire_lock("k", "run-b", acquire_timeout=0.3)
        assert not locks.wait_for_lock("k", timeout=0.2)

        # Same pid, another start time: the holder died and the kernel reused its pid.
        # Its day-long lease is free at once (no wait), and taken over.
        this_host_lease(tmp_path, other.pid, start_time(other.pid) + 1, expires_in=86_400)
        assert not locks.is_locked("k") and locks.wait_for_lock("k", timeout=0)
        assert locks.acquire_lock("k", "run-b", acquire_timeout=60)
        assert locks.is_lock_holder("k", "run-b")
        locks.release_lock("k", "run-b")
    finally:
        other.kill()
        other.wait()


def test_a_dead_holder_is_taken_over_by_one_waiter_only(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    this_host_lease(tmp_path, int(gone.stdout), 12345)
    barrier = threading.Barrier(4)
    won: list[str] = []

    def contend(name: str) -> None:
        barrier.wait()
        if LeaseLockManager(tmp_path, hold=600).acquire_lock("k", name, acquire_timeout=1.0):
            won.append(name)

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    LeaseLockManager(tmp_path, hold=600).release_lock("k", won[0])
