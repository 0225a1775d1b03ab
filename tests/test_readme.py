"""Every code block of README.md runs as written.

Each fenced block whose language is ``bash``/``sh``/``shell`` or
``python``/``py`` is a test of its own, run in README order in one working
folder (so a later block can use what an earlier one wrote) against a real
Prefect server this module starts (``PREFECT_API_URL`` is set, as after
``prefect server start --background``). The folder holds the files the README
names, made from the bundled datasets: ``data.csv`` (housing, target
``price``), ``data.parquet`` (churn, target ``churned``) and ``new_rows.csv``
(churn rows without the target). Bash blocks run with ``bash -e`` and this
interpreter's scripts folder first on ``PATH`` (so ``prefect-torch`` and
``prefect`` are those of this environment); Python blocks run as scripts.
Blocks in other languages (or none) are not run.

Exempting a block: put an HTML comment on the last non-blank line before its
opening fence, with the reason in parentheses (it shows as the skip reason)::

    <!-- readme-test: skip (needs an S3 bucket and credentials) -->

Exempt only what cannot run here in a minute or so: a fresh-machine install,
the whole suite, commands that need workers, a GPU, a fixed port or cloud
credentials. A skip marker without a reason fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.server]

README = Path(__file__).resolve().parents[1] / "README.md"
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
SKIP_MARKER = re.compile(r"^<!--\s*readme-test:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<language>[\w+-]*)")
BLOCK_TIMEOUT_S = 900  # generous: a loaded two-core machine trains 50x slower than an idle one


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str  # "bash" or "python"
    code: str
    skip: str | None  # the reason, when exempt

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.language}"


def readme_blocks(text: str) -> list[Block]:
    """The runnable fenced blocks of ``text`` with their skip reasons."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, language = opening["fence"], opening["language"].lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), len(lines))
        if language in LANGUAGES:
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP_MARKER.match(previous)
            skip = None
            if marker is not None:
                skip = (marker["reason"] or "").strip()
                if not skip:
                    raise ValueError(f"README.md line {i + 1}: a readme-test skip marker needs a reason in parentheses")
            blocks.append(Block(i + 1, LANGUAGES[language], "\n".join(lines[i + 1:end]) + "\n", skip))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_the_block_parser_reads_fences_and_skip_markers():
    text = (
        "intro\n\n```bash\necho one\n```\n\n<!-- readme-test: skip (slow) -->\n\n```python\nprint(2)\n```\n"
        "```\nnot run\n```\n```yaml\nkey: value\n```\n"
    )
    assert readme_blocks(text) == [Block(3, "bash", "echo one\n", None), Block(9, "python", "print(2)\n", "slow")]
    with pytest.raises(ValueError, match="needs a reason"):
        readme_blocks("<!-- readme-test: skip -->\n```bash\ntrue\n```\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's folder: the files the README's examples name."""
    folder = tmp_path_factory.mktemp("readme")
    data = resources.files("prefect_torch.examples") / "data"
    with resources.as_file(data / "housing.csv") as housing:
        shutil.copy(housing, folder / "data.csv")
    with resources.as_file(data / "churn.csv") as churn_csv:
        churn = pd.read_csv(churn_csv)
    churn.to_parquet(folder / "data.parquet", index=False)
    churn.drop(columns="churned").head(50).to_csv(folder / "new_rows.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def block_env(prefect_server) -> dict[str, str]:
    scripts = str(Path(sys.executable).parent)
    return {**prefect_server.env, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs(block: Block, workdir: Path, block_env: dict[str, str]):
    if block.skip is not None:
        pytest.skip(block.skip)
    if block.language == "bash":
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        script = workdir / f"readme_line{block.line}.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    out = subprocess.run(
        command, cwd=workdir, env=block_env, capture_output=True, text=True,
        timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, f"README.md line {block.line}:\n{block.code}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-5000:]
