"""A train run in this process, watching who opens one file.

    python -m tests.caching.run_audited REQUEST_JSON        # run_train_flow's argv
    python -m tests.caching.run_audited --cli ARGV_JSON     # the prefect-torch command (cli.main)

The environment variable ``WATCH_PATH`` names a file. After the run's own output,
prints ``{"opened_by": [...], "split_in": [...], "tensor_files_written_in": [...]}``:
for every open of that file during the run (an audit hook sees Python's
``open``/``os.open`` and the opens of libraries that read through Python), the
prefect_torch function that made it; for every split of a table
(``engine.split.split_table``), the name of the thread that made it; and for every
tensor file written (a new file in a ``tensors`` folder), the name of the thread
that wrote it.
"""

import json
import os
import sys
import threading

WATCHED = os.path.realpath(os.environ["WATCH_PATH"])
opened_by: list[str] = []
tensor_files_written_in: list[str] = []


def _opener() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        if "prefect_torch" in frame.f_code.co_filename:
            return frame.f_code.co_name
        frame = frame.f_back
    return "?"


def _hook(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path == WATCHED:
            opened_by.append(_opener())
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        if os.path.basename(os.path.dirname(path)) == "tensors" and flags & os.O_CREAT:
            tensor_files_written_in.append(threading.current_thread().name)


def _count_splits() -> list[str]:
    # Before anything imports split_table by name (the Data Split card does).
    import prefect_torch.engine.split as split

    split_in: list[str] = []
    real = split.split_table

    def counted(*args, **kwargs):
        split_in.append(threading.current_thread().name)
        return real(*args, **kwargs)

    split.split_table = counted
    return split_in


def main() -> None:
    sys.addaudithook(_hook)
    split_in = _count_splits()
    if sys.argv[1] == "--cli":
        from prefect_torch.cli import main as command

        code = command(json.loads(sys.argv[2]))
    else:
        from tests.caching import run_train_flow

        run_train_flow.main()
        code = 0
    print(json.dumps({"opened_by": opened_by, "split_in": split_in,
                      "tensor_files_written_in": tensor_files_written_in}))
    sys.exit(code)


if __name__ == "__main__":
    main()
