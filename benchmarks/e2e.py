"""End-to-end figures of issue 17, printed as JSON: the `prefect-torch train` command
against the plain script a careful engineer writes (benchmarks/plain_script.py),
side by side on one synthetic Parquet file, against a running Prefect server.

Each run is a fresh subprocess; wall time and peak RSS (of the process and the
children it waited for, from wait4) are measured from outside:

- plain: the hand-written script, run three times (before the first command, before
  model_only and at the end); the median is the base of every ratio;
- first: `prefect-torch train d.parquet --target y --epochs 1 --batch-size 4096 --hidden 64`
  with empty result storage and no warm process: the command runs in its own
  process (and leaves a warm process behind, see prefect_torch.warm);
- cached: the same command again (every card a cache hit), once the warm process the
  first command left is ready (``warm_process_ready_after_s``: how long after the first
  command that was; a rerun sooner waits for the rest of it, never longer than running alone);
- model_only: again with only `--hidden 128` (data cards cached, training runs);
- first_warm: the first command on another file of the same size (nothing cached,
  imports already made by the warm process): a user's first run on new data
  after any earlier command.

A command a warm process ran is its child, not the caller's: its peak RSS is
reported by the warm process (``PREFECT_TORCH_WARM_REPORT``) and counted as the
run's. The warm process's own idle RSS is printed apart (``warm_process_rss_mb``);
most of it is shared with each command it forks.

Ratios are against the plain script (targets: first ≤ 1.3, model_only ≤ 0.8,
cached ≤ 0.5, peak RSS ≤ 1.2; first_warm is held to the first run's 1.3), and without the training loops of both sides (their time swings most with load on a shared machine). ``cards`` gives each run's flow-level overhead per
card from the server's state history: the seconds from a card's first state to its
last (for Train, minus the training loop when it ran), the flow's start (flow
Running → first card) and end (last card → flow Completed), and the process's own
start-up and shutdown around the flow run.

With ``--format csv`` the same table is written as CSV (about 700 MB at 1M × 64)
and the plain script reads it with ``pandas.read_csv``.

    python benchmarks/e2e.py [--rows 1000000] [--features 64] [--format parquet|csv] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.prefect_server import prefect_server  # noqa: E402

CARDS = ("data_load", "data_split", "model_define", "train", "evaluate", "model_save")


def make_dataset(path: Path, rows: int, features: int, seed: int = 0) -> None:
    """A float32 regression table: y = X·w + noise, written in row groups of 256k
    (as Parquet, or as CSV when ``path`` ends in .csv)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=features).astype(np.float32)
    writer = None
    for start in range(0, rows, 1 << 18):
        n = min(1 << 18, rows - start)
        X = rng.normal(size=(n, features)).astype(np.float32)
        y = X @ weights + rng.normal(scale=0.1, size=n).astype(np.float32)
        columns = {f"x{i}": X[:, i] for i in range(features)} | {"y": y}
        table = pa.table(columns)
        if path.suffix == ".csv":
            writer = writer or pa_csv.CSVWriter(path, table.schema)
        else:
            writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def run_with_rss(args: list[str], env: dict[str, str], cwd: Path, quiet_timeout: float) -> dict:
    """Run ``args`` from a fresh Python process, so that process's RUSAGE_CHILDREN peak
    is this run's alone, once the machine is quiet; its wall time, peak RSS (MB) and the
    JSON its stdout ends with. When a warm process ran the command, the peak is its
    child's, as it reports. ``quiet_timeout``: the longest wait for an idle machine."""
    wait_for_quiet_machine(quiet_timeout)
    report = cwd / "warm-report.json"
    report.unlink(missing_ok=True)
    env = {**env, "PREFECT_TORCH_WARM_REPORT": str(report)}
    helper = (
        "import json, resource, subprocess, sys, time\n"
        "args = json.loads(sys.argv[1])\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(args, capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'rc': p.returncode, 'seconds': wall, 'rss_mb': rss,"
        " 'stdout': p.stdout[-20000:], 'stderr': p.stderr[-4000:]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", helper, json.dumps(args)], env=env, cwd=cwd,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{args[:3]} failed ({result['rc']}):\n{result['stderr']}\n{result['stdout'][-2000:]}")
    lines = [line for line in result["stdout"].splitlines() if line.startswith("{")]
    warm = json.loads(report.read_text()) if report.exists() else None
    rss_mb = max(result["rss_mb"], (warm["peak_rss_kb"] / 1024) if warm else 0.0)
    return {"seconds": round(result["seconds"], 3), "peak_rss_mb": round(rss_mb, 1), "warm": warm is not None,
            "output": json.loads(lines[-1]) if lines else None}


def wait_for_quiet_machine(timeout: float = 120.0, busy_below: float = 0.1) -> float:
    """Seconds waited until the machine's CPUs are idle (under ``busy_below`` busy over 2 s),
    so that no run is timed while the server starts its services or a write-back runs."""
    def ticks() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        total, idle = ticks()
        time.sleep(2)
        total2, idle2 = ticks()
        if total2 > total and 1 - (idle2 - idle) / (total2 - total) < busy_below:
            break
    return round(time.perf_counter() - started, 1)


def wait_for_warm_process(env: dict[str, str], cwd: Path, since: float, timeout: float = 300.0) -> float:
    """Seconds from ``since`` (a perf_counter time) until the warm process for commands
    run with ``env`` in ``cwd`` accepts them."""
    from prefect_torch.warm.client import warm_process

    while not (process := warm_process(env, cwd)) or not process["ready"]:
        if time.perf_counter() - since > timeout:
            raise RuntimeError(f"no warm process became ready in {timeout:.0f} s")
        time.sleep(0.05)
    return round(time.perf_counter() - since, 3)


def warm_process_rss_mb(env: dict[str, str], cwd: Path) -> float | None:
    """Resident memory of the idle warm process serving this benchmark's commands."""
    from prefect_torch.warm.client import warm_process

    process = warm_process(env, cwd)
    if process is None:
        return None
    for line in Path(f"/proc/{process['pid']}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def import_seconds(statement: str, env: dict[str, str], runs: int = 3) -> float:
    """Median wall time of a bare ``python -c statement`` (imports): the start-up every
    process of that kind pays before any work."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], env=env, check=True)
        times.append(time.perf_counter() - started)
    return round(sorted(times)[len(times) // 2], 3)


def _when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def card_overheads(server, train_seconds: float | None, process_seconds: float) -> dict:
    """Per-card seconds of the newest flow run, from the server's state history."""
    run = server.request("POST", "flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1})[0]
    deadline = time.monotonic() + 60
    while True:  # task run states reach the server through events: wait until all are final
        tasks = server.request("POST", "task_runs/filter",
                               json={"flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 200})
        states = {t["id"]: server.request("GET", f"task_run_states/?task_run_id={t['id']}") for t in tasks}
        final = all(any(s["type"] in ("COMPLETED", "FAILED") for s in states[t["id"]]) for t in tasks)
        if (final and len(tasks) >= len(CARDS)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    flow_states = sorted(server.request("GET", f"flow_run_states/?flow_run_id={run['id']}"),
                         key=lambda s: s["timestamp"])
    running = next(_when(s["timestamp"]) for s in flow_states if s["type"] == "RUNNING")
    finished = _when(flow_states[-1]["timestamp"])
    cards: dict[str, dict] = {}
    spans = []
    for task in tasks:
        history = sorted(states[task["id"]], key=lambda s: s["timestamp"])
        first, last = _when(history[0]["timestamp"]), _when(history[-1]["timestamp"])
        spans.append((first, last))
        name = task["task_key"].split("-")[0] if task["name"].startswith("materialize") else task["name"].split("[")[0]
        entry = {"seconds": round(last - first, 3), "state": history[-1]["name"]}
        if name == "train" and history[-1]["name"] != "Cached" and train_seconds is not None:
            entry["loop_seconds"] = round(train_seconds, 3)
            entry["overhead_seconds"] = round(last - first - train_seconds, 3)
        cards[name] = entry
    spans.sort()
    flow_seconds = finished - running
    return {
        "cards": cards,
        "flow_start": round(spans[0][0] - running, 3) if spans else None,
        "flow_end": round(finished - spans[-1][1], 3) if spans else None,
        "flow_run_seconds": round(flow_seconds, 3),
        "process_outside_flow_run": round(process_seconds - flow_seconds, 3),
    }


def _loop(run: dict) -> float:
    """Seconds the run spent in its training loop (0 when Train was a cache hit)."""
    if "cards" not in run:
        return float((run.get("output") or {}).get("train_seconds") or 0.0)
    return float(run["cards"].get("train", {}).get("loop_seconds") or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--quick", action="store_true", help="20,000 rows: checks that the benchmark runs")
    args = parser.parse_args()
    rows = 20_000 if args.quick else args.rows
    # --quick only checks that the benchmark runs, often next to other tests: no waiting
    # for an idle machine.
    quiet_timeout = 0.0 if args.quick else 120.0

    with tempfile.TemporaryDirectory(prefix="ptorch-e2e-") as tmp:
        work = Path(tmp)
        data = work / f"d.{args.format}"
        make_dataset(data, rows, args.features)
        other = work / f"other.{args.format}"
        make_dataset(other, rows, args.features, seed=1)
        file_mb = round(data.stat().st_size / 2**20, 1)
        with prefect_server(work / "server") as server:
            env = {**server.env, "PYTHONPATH": str(REPO)}
            os.sync()  # the datasets just written: their write-back must not land in a timed run

            def plain_run() -> dict:
                return run_with_rss([sys.executable, str(REPO / "benchmarks" / "plain_script.py"), str(data),
                                     "--target", "y", "--output", str(work / "plain.safetensors")], env, work,
                                    quiet_timeout)

            # The plain script runs before, between and after the others; its median is the
            # base, so a busy moment of the machine (the server's start, a write-back) does
            # not flatter or penalise either side.
            plain_runs = [plain_run()]
            command = [str(Path(sys.executable).with_name("prefect-torch")), "train"]
            options = ["--target", "y", "--epochs", "1", "--batch-size", "4096", "--json"]
            runs = {}
            for name, source, extra in (("first", data, ["--hidden", "64"]), ("cached", data, ["--hidden", "64"]),
                                        ("model_only", data, ["--hidden", "128"]),
                                        ("first_warm", other, ["--hidden", "64"])):
                if name == "model_only":
                    plain_runs.append(plain_run())
                result = run_with_rss(command + [str(source)] + options + extra, env, work, quiet_timeout)
                finished = time.perf_counter()
                output = result.pop("output") or {}
                result["test_metrics"] = output.get("metrics")
                result.update(card_overheads(server, output.get("train_seconds"), result["seconds"]))
                runs[name] = result
                if name == "first":
                    ready_after = wait_for_warm_process(env, work, since=finished)
            warm_rss = warm_process_rss_mb(env, work)
            plain_runs.append(plain_run())
            plain = sorted(plain_runs, key=lambda run: run["seconds"])[1]
            plain["all_seconds"] = [run["seconds"] for run in plain_runs]
            runs = {"plain": plain, **runs}
        # The flows import on first use: time what `prefect-torch train` itself imports.
        floors = {"plain": import_seconds("import torch, pandas, safetensors.torch", env),
                  "prefect_torch": import_seconds("import prefect_torch.cli; from prefect_torch.flows import train_flow",
                                                  env)}
    base = plain["seconds"]
    figures = {
        "rows": rows,
        "features": args.features,
        "format": args.format,
        "file_mb": file_mb,
        "runs": runs,
        "ratios": {
            "first_vs_plain": round(runs["first"]["seconds"] / base, 3),
            "model_only_vs_plain": round(runs["model_only"]["seconds"] / base, 3),
            "cached_vs_plain": round(runs["cached"]["seconds"] / base, 3),
            "first_warm_vs_plain": round(runs["first_warm"]["seconds"] / base, 3),
            "peak_rss_vs_plain": round(max(r["peak_rss_mb"] for k, r in runs.items() if k != "plain")
                                       / plain["peak_rss_mb"], 3),
        },
        # The training loops run the same model on the same rows; on a shared machine their
        # time swings with load, so the rest (what caching and the flow change) is shown too.
        "ratios_excluding_training_loops": {
            name: round((runs[name]["seconds"] - _loop(runs[name])) / (base - _loop(plain)), 3)
            for name in ("first", "model_only", "cached", "first_warm")
        },
        "warm_process_rss_mb": warm_rss,
        "warm_process_ready_after_s": ready_after,
        # What each side pays to start before touching data (a bare `python -c "import ..."`);
        # both also import torch._dynamo (about 1 s here) when they build their first optimizer.
        "import_seconds": floors,
        "targets": {"first_vs_plain": 1.3, "model_only_vs_plain": 0.8, "cached_vs_plain": 0.5,
                    "first_warm_vs_plain": 1.3, "peak_rss_vs_plain": 1.2},
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
