"""``prefect-torch`` (``cli.main``) in this process, watching who opens one file.

argv: the command's arguments as JSON; the environment variable ``WATCH_PATH``
names a file. After the command's output, prints ``{"opened_by": [...]}``: for
every open of that file (an audit hook sees the opens of Python and of libraries
that read through it), the prefect_torch function that made it.
"""

import json
import os
import sys

WATCHED = os.path.realpath(os.environ["WATCH_PATH"])
opened_by: list[str] = []


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


def main() -> None:
    from prefect_torch.cli import main as command

    sys.addaudithook(_hook)
    code = command(json.loads(sys.argv[1]))
    print(json.dumps({"opened_by": opened_by}))
    sys.exit(code)


if __name__ == "__main__":
    main()
