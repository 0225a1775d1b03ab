"""The command line's wait before the first epoch, printed as JSON.

Times ``prefect-torch train small.csv`` from the command's start to its first
``epoch 1/N`` log line, as a user sees it, two ways:

- running_server: a ``prefect server start --background`` under the same
  ``PREFECT_HOME`` (no ``PREFECT_API_URL``: the CLI finds it by its pid file).
  Target: ≤ 5 s.
- temporary_server: no server running; Prefect starts its temporary server
  for each command (its database already migrated by a first, untimed run,
  whose time is reported apart as temporary_first_run_s).

Each run uses another seed, so the Train card is not a cache hit (loading and
splitting the same file are, as for a user's second command).

Both run each command in its own process (``PREFECT_TORCH_WARM=0``): the wait
of a first command. A third figure, warm_process, is the running server again
with the warm process a first command leaves behind (prefect_torch.warm): the
wait of every later command.

import_floor: a bare ``python -c "import torch, torch._dynamo, pandas, prefect"``,
what any process that trains with torch (the first optimizer imports
``torch._dynamo``) and talks to Prefect pays before its first epoch on this
machine; the rest of running_server is the flow's own cost.

    python benchmarks/first_epoch.py [--rows 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

FIRST_EPOCH = re.compile(r"epoch 1/\d+ train_loss=")


def clean_env(home: Path, warm: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_TORCH_WARM"] = "1" if warm else "0"
    return env


def time_to_first_epoch(data: Path, home: Path, seed: int, expect_url: bool = False, warm: bool = False) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect_torch.cli", "train", str(data), "--target", "y",
         "--epochs", "2", "--hidden", "16", "--seed", str(seed)],
        env=clean_env(home, warm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first = None
    seen: list[str] = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if first is None and FIRST_EPOCH.search(line):
            first = time.perf_counter() - started
    assert process.stdout is not None
    stdout = process.stdout.read()
    if process.wait() != 0 or first is None:
        tail = "".join(seen[-20:])
        raise RuntimeError(f"the run (seed {seed}) failed or logged no first epoch:\n{tail}")
    if expect_url and "flow run in the Prefect UI:" not in stdout:
        raise RuntimeError("the run did not use the running server (it printed no run URL)")
    return first


def warm_process_runs(data: Path, home: Path, runs: int) -> list[float]:
    """A first command (untimed) leaves a warm process; once it is ready, time ``runs`` more."""
    from prefect_torch.warm.client import stop, warm_process

    time_to_first_epoch(data, home, seed=2000, expect_url=True, warm=True)
    env = clean_env(home, warm=True)
    deadline = time.monotonic() + 300
    while not (process := warm_process(env, os.getcwd())) or not process["ready"]:
        if time.monotonic() > deadline:
            raise RuntimeError("no warm process became ready")
        time.sleep(0.1)
    try:
        return [time_to_first_epoch(data, home, seed=2001 + i, expect_url=True, warm=True) for i in range(runs)]
    finally:
        stop([process])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_background_server(home: Path, timeout: float = 300) -> None:
    import httpx

    port = free_port()
    prefect = str(Path(sys.executable).with_name("prefect"))
    # Without internet, a background server with analytics on dies soon after
    # its start (its telemetry error goes to a pipe nobody reads any more).
    env = {**clean_env(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run([prefect, "server", "start", "--background", "--host", "127.0.0.1", "--port", str(port)],
                   env=env, check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the background server did not come up")


def stop_background_server(home: Path) -> None:
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "server", "stop"], env=clean_env(home), capture_output=True)


def import_floor() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, torch._dynamo, pandas, prefect"], check=True)
    return time.perf_counter() - started


def summary(times: list[float]) -> dict[str, object]:
    return {"median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
            "all_s": [round(t, 2) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="first-epoch-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        frame = pd.DataFrame(rng.normal(size=(args.rows, 4)), columns=["a", "b", "c", "d"])
        frame["y"] = frame.sum(axis=1) + rng.normal(scale=0.1, size=args.rows)
        data = root / "small.csv"
        frame.to_csv(data, index=False)

        temporary_home = root / "temporary-home"
        first_run = time_to_first_epoch(data, temporary_home, seed=1000)
        temporary = [time_to_first_epoch(data, temporary_home, seed=i) for i in range(args.runs)]

        running_home = root / "running-home"
        start_background_server(running_home)
        try:
            time_to_first_epoch(data, running_home, seed=1000, expect_url=True)  # the first run: not timed
            running = [time_to_first_epoch(data, running_home, seed=i, expect_url=True) for i in range(args.runs)]
            warm = warm_process_runs(data, running_home, args.runs)
        finally:
            stop_background_server(running_home)
        floor = [import_floor() for _ in range(args.runs)]

    print(json.dumps({
        "rows": args.rows,
        "runs": args.runs,
        "running_server": summary(running),
        "temporary_server": summary(temporary),
        "warm_process": summary(warm),
        "import_floor": summary(floor),
        "running_over_import_floor": round(statistics.median(running) / statistics.median(floor), 3),
        "temporary_first_run_s": round(first_run, 2),
        "running_over_temporary": round(statistics.median(running) / statistics.median(temporary), 3),
        "target_running_server_s": 5.0,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
