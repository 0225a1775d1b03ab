"""run_train_flow in this process, watching which files it opens.

argv as for ``run_train_flow``; the environment variable ``WATCH_PATH`` names a
file. After run_train_flow's JSON line, prints ``{"opened": [...]}``: every open
of that file (Python's ``open``/``os.open``, through an audit hook, which also
sees the opens of libraries that read through Python) during the run.
"""

import json
import os
import sys

WATCHED = os.path.realpath(os.environ["WATCH_PATH"])
opened: list[str] = []


def _hook(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path == WATCHED:
            opened.append(f"{path} mode={args[1] if len(args) > 1 else '?'}")


def main() -> None:
    from tests.caching import run_train_flow

    sys.addaudithook(_hook)
    run_train_flow.main()
    print(json.dumps({"opened": opened}))


if __name__ == "__main__":
    main()
