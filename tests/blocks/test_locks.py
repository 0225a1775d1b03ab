"""Leased locks: a live holder keeps its lease past the hold time, a dead one loses
it after the hold time, and the lease length is validated."""

from __future__ import annotations

import json
import threading
import time

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
