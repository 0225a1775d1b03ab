"""Work started early in a background thread, taken once by whoever needs it.

A command's first second or two go to importing Prefect and creating its flow
run, which hold the GIL; reading, hashing and parsing a dataset file mostly
release it. So the CLI starts the Data Load card's read as soon as it knows the
dataset (``prefect_torch.engine.data.start_loading``), then the Data Split's
work on that table (``prefect_torch.engine.split.start_splitting``); each card
takes its result when it runs instead of doing the work again.

A job never imports: the caller imports what it needs first, because an import
in this thread racing one in the main thread could deadlock. A job that fails
leaves nothing behind: whoever needed its result does the work itself and meets
the same error the usual way.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_jobs: dict[str, "_Job"] = {}
_generation = 0  # how many times ``discard`` ran: a job started for an earlier one is not wanted


class _Job:
    def __init__(self, work: Callable[[], Any], follows: Any = None):
        self.work = work
        self.follows = follows
        self.done = threading.Event()
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException:  # noqa: BLE001 - the taker redoes the work and meets the error there
            self.result = None
        finally:
            self.done.set()


def start(name: str, work: Callable[[], Any], *, follows: Any = None,
          unless_discarded_since: int | None = None) -> bool:
    """Run ``work()`` in a daemon thread; its result is ``take(name)``'s. Whether it started:
    with ``unless_discarded_since`` (a ``generation()``), not if ``discard`` ran since then,
    so a job that follows one nobody took is not left holding its result. ``follows`` is
    the object the work is made from (see ``discard``)."""
    job = _Job(work, follows)
    with _lock:
        if unless_discarded_since is not None and unless_discarded_since != _generation:
            return False
        _jobs[name] = job
    threading.Thread(target=job.run, name=f"prefect-torch-prefetch-{name}", daemon=True).start()
    return True


def generation() -> int:
    """A mark for ``start(..., unless_discarded_since=...)``."""
    with _lock:
        return _generation


def wait(name: str) -> None:
    """Return once the job called ``name`` (if one was started and not taken) has finished."""
    with _lock:
        job = _jobs.get(name)
    if job is not None:
        job.done.wait()


def take(name: str) -> Any:
    """The result of the job called ``name``, once it has finished; ``None`` if there is
    no such job, it failed, or it was taken already."""
    with _lock:
        job = _jobs.pop(name, None)
    if job is None:
        return None
    job.done.wait()
    return job.result


def discard(keep_following: Any = None) -> None:
    """Forget every job not taken (a cached Load needed none): its result is let go
    as soon as its thread ends. Jobs that follow ``keep_following`` (the very object,
    say the table a card took) stay, for the card that needs them next."""
    global _generation
    with _lock:
        for name, job in list(_jobs.items()):
            if keep_following is None or job.follows is not keep_following:
                del _jobs[name]
        _generation += 1


__all__ = ["start", "generation", "wait", "take", "discard"]
