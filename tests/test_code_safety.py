"""Code safety: nothing in the package can deserialise pickle.

Loading pickle runs code chosen by whoever wrote the bytes, so a shared result
store, checkpoint folder or dataset bucket would become a way in. The package's
source is parsed with ``ast`` (imports and aliases resolved, so ``import pickle as
p; p.loads`` is caught, and a mention in a comment or string is not) and must not:

- call ``pickle``/``cloudpickle``/``dill``/``joblib``/``shelve``/``marshal`` loaders;
- call ``torch.load`` without ``weights_only=True`` spelled out;
- call ``pandas.read_pickle``, or ``numpy.load`` with ``allow_pickle`` other than False;
- use Prefect's pickle serializers: ``PickleSerializer``/``CompressedPickleSerializer``,
  or a ``"pickle"``/``"cloudpickle"``/``"compressed/pickle"`` serializer name;
- make a task or flow persist results (``persist_result=True``, a cache policy, a
  cache key function, a result storage or storage key) without naming its
  ``result_serializer``: Prefect's default serializer is pickle.

The scanner is tested on small bad and good snippets, so a pass means something.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prefect_torch"

PICKLE_LOADERS = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cPickle", "cloudpickle", "dill")
    for name in ("load", "loads", "Unpickler")
} | {"joblib.load", "shelve.open", "marshal.load", "marshal.loads", "pandas.read_pickle"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}
PICKLE_SERIALIZERS = {"PickleSerializer", "CompressedPickleSerializer"}
SERIALIZER_KEYWORDS = {"result_serializer", "serializer", "cache_serializer"}
PERSIST_TRIGGERS = {"persist_result", "cache_policy", "cache_key_fn", "result_storage", "result_storage_key"}
TASK_FACTORIES = {"prefect.task", "prefect.flow", "prefect.tasks.task", "prefect.flows.flow"}


@dataclass(frozen=True)
class Finding:
    where: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.rule}"


class _Scanner(ast.NodeVisitor):
    def __init__(self, where: str):
        self.where = where
        self.aliases: dict[str, str] = {}  # local name -> dotted origin
        self.findings: list[Finding] = []

    # --- name resolution
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                root = alias.name.split(".")[0]
                self.aliases[root] = root
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            origin = f"{node.module}.{alias.name}" if node.module else alias.name
            self.aliases[alias.asname or alias.name] = origin
            if alias.name in PICKLE_SERIALIZERS:
                self._flag(node, f"imports Prefect's {alias.name}")
        self.generic_visit(node)

    def resolve(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    # --- rules
    def visit_Call(self, node: ast.Call) -> None:
        name = self.resolve(node.func) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        splat = any(k.arg is None for k in node.keywords)
        attr = node.func.attr if isinstance(node.func, ast.Attribute) else None

        if name in PICKLE_LOADERS or attr == "read_pickle":
            self._flag(node, f"calls {name or attr} (deserialises pickle)")
        if name in TORCH_LOADS and not _is_const(keywords.get("weights_only"), True):
            self._flag(node, f"calls {name} without weights_only=True")
        if name in NUMPY_LOADS and (splat or ("allow_pickle" in keywords
                                              and not _is_const(keywords["allow_pickle"], False))):
            self._flag(node, "calls numpy.load with allow_pickle enabled")
        for key in SERIALIZER_KEYWORDS & keywords.keys():
            if _names_pickle(keywords[key]):
                self._flag(node, f"passes a pickle serializer as {key}=")
        if name.endswith("Serializer") and _names_pickle(keywords.get("type")):
            self._flag(node, "builds a pickle serializer by type name")
        is_factory = name in TASK_FACTORIES or attr == "with_options"
        if is_factory and not splat and "result_serializer" not in keywords and _persists(keywords):
            self._flag(node, "persists results with Prefect's default (pickle) serializer; "
                             "set result_serializer to a safe one")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and key.value in SERIALIZER_KEYWORDS and _names_pickle(value):
                self._flag(node, f"maps {key.value} to a pickle serializer")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in PICKLE_SERIALIZERS:
            self._flag(node, f"uses Prefect's {node.id}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in PICKLE_SERIALIZERS:
            self._flag(node, f"uses Prefect's {node.attr}")
        self.generic_visit(node)

    def _flag(self, node: ast.AST, rule: str) -> None:
        self.findings.append(Finding(self.where, getattr(node, "lineno", 0), rule))


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _names_pickle(node: ast.AST | None) -> bool:
    """A serializer given as a string naming pickle, or a PickleSerializer(...)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return "pickle" in node.value.lower()
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, (ast.Name, ast.Attribute)) and (
        getattr(node, "id", None) in PICKLE_SERIALIZERS or getattr(node, "attr", None) in PICKLE_SERIALIZERS
    )


def _persists(keywords: dict[str, ast.AST]) -> bool:
    """Whether these task/flow options make Prefect persist results."""
    if "persist_result" in keywords:
        return not _is_const(keywords["persist_result"], False) and not _is_const(keywords["persist_result"], None)
    policy = keywords.get("cache_policy")
    if policy is not None and not _is_no_cache(policy):
        return True
    return any(k in keywords for k in PERSIST_TRIGGERS - {"persist_result", "cache_policy"})


def _is_no_cache(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "NO_CACHE") or (
        isinstance(node, ast.Attribute) and node.attr == "NO_CACHE") or _is_const(node, None)


def scan_source(source: str, where: str = "<snippet>") -> list[Finding]:
    scanner = _Scanner(where)
    scanner.visit(ast.parse(source, filename=where))
    return scanner.findings


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


# --- the package ---------------------------------------------------------------------


def test_package_has_no_unsafe_deserialisation():
    findings = [
        finding
        for path in package_files()
        for finding in scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    ]
    assert not findings, "Unsafe deserialisation in the package:\n" + "\n".join(map(str, findings))


def test_scan_covers_the_package():
    names = {path.relative_to(PACKAGE).as_posix() for path in package_files()}
    assert {"engine/persist.py", "engine/data.py", "flows/train.py", "tasks/train.py"} <= names
    assert len(names) >= 20


# --- the scanner itself: it must be able to fail ------------------------------------

BAD = {
    "pickle.loads": "import pickle\npickle.loads(b'')",
    "pickle.load aliased": "import pickle as p\np.load(open('f', 'rb'))",
    "from pickle import loads": "from pickle import loads as undo\nundo(b'')",
    "pickle.Unpickler": "import pickle\npickle.Unpickler(f).load()",
    "cloudpickle.loads": "import cloudpickle\ncloudpickle.loads(b'')",
    "dill.loads": "import dill\ndill.loads(b'')",
    "joblib.load": "import joblib\njoblib.load('m.joblib')",
    "torch.load bare": "import torch\ntorch.load('m.pt')",
    "torch.load weights_only=False": "import torch\ntorch.load('m.pt', weights_only=False)",
    "torch.load weights_only variable": "import torch\ntorch.load('m.pt', weights_only=flag)",
    "torch.load kwargs": "import torch\ntorch.load('m.pt', **options)",
    "from torch import load": "from torch import load\nload('m.pt')",
    "torch.serialization.load": "import torch.serialization\ntorch.serialization.load('m.pt')",
    "pd.read_pickle": "import pandas as pd\npd.read_pickle('f.pkl')",
    "from pandas import read_pickle": "from pandas import read_pickle\nread_pickle('f.pkl')",
    "numpy.load allow_pickle": "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "numpy.load allow_pickle variable": "import numpy\nnumpy.load('a.npy', allow_pickle=ok)",
    "PickleSerializer import": "from prefect.serializers import PickleSerializer",
    "PickleSerializer attribute": "import prefect.serializers as s\ns.PickleSerializer()",
    "CompressedPickleSerializer": "from prefect.serializers import CompressedPickleSerializer",
    "task result_serializer pickle": "from prefect import task\n@task(result_serializer='pickle')\ndef f(): ...",
    "flow result_serializer cloudpickle": "from prefect import flow\n@flow(result_serializer='cloudpickle')\ndef f(): ...",
    "with_options compressed/pickle": "f.with_options(result_serializer='compressed/pickle')",
    "ResultStore serializer": "from prefect.results import ResultStore\nResultStore(serializer='pickle')",
    "options dict": "OPTIONS = {'result_serializer': 'pickle'}",
    "options dict()": "OPTIONS = dict(result_serializer='pickle')",
    "Serializer by type": "from prefect.serializers import Serializer\nSerializer(type='pickle')",
    "persist without serializer": "from prefect import task\n@task(persist_result=True)\ndef f(): ...",
    "cache policy without serializer": (
        "import prefect\nfrom prefect.cache_policies import INPUTS\n"
        "@prefect.task(cache_policy=INPUTS)\ndef f(): ..."),
    "result storage without serializer": "from prefect import flow\n@flow(result_storage=store)\ndef f(): ...",
    "with_options persist": "f.with_options(persist_result=True)",
}

GOOD = {
    "torch.load weights_only": "import torch\ntorch.load('m.pt', weights_only=True, map_location='cpu')",
    "safetensors": "from safetensors.torch import load\nload(b'')",
    "json": "import json\njson.loads('{}')",
    "numpy.load default": "import numpy as np\nnp.load('a.npy')",
    "numpy.load allow_pickle False": "import numpy as np\nnp.load('a.npy', allow_pickle=False)",
    "no-cache card": (
        "from prefect import task\nfrom prefect.cache_policies import NO_CACHE\n"
        "@task(cache_policy=NO_CACHE, persist_result=False)\ndef f(): ..."),
    "persist with safe serializer": (
        "from prefect import task\n@task(persist_result=True, result_serializer='prefect-torch')\ndef f(): ..."),
    "cache policy with json": (
        "from prefect import task\nfrom prefect.cache_policies import INPUTS\n"
        "@task(cache_policy=INPUTS, result_serializer='json')\ndef f(): ..."),
    "bare task": "from prefect import task\n@task\ndef f(): ...",
    "options splat": "from prefect import task\n@task(**OPTIONS)\ndef f(): ...",
    "pickle in text only": "# pickle.loads is never used\nDOC = 'we refuse pickle.loads and PickleSerializer'",
    "unrelated load": "model.load_state_dict(state)\nconfig.load('x')",
    "persist off": "f.with_options(persist_result=False, cache_key_fn=None)",
}


@pytest.mark.parametrize("snippet", list(BAD.values()), ids=list(BAD))
def test_scanner_flags_unsafe_snippet(snippet):
    assert scan_source(snippet), f"not flagged:\n{snippet}"


@pytest.mark.parametrize("snippet", list(GOOD.values()), ids=list(GOOD))
def test_scanner_accepts_safe_snippet(snippet):
    assert scan_source(snippet) == []


def test_finding_names_file_line_and_rule():
    (finding,) = scan_source("import json\n\nimport torch\ntorch.load('m.pt')\n", "pkg/mod.py")
    assert str(finding) == "pkg/mod.py:4: calls torch.load without weights_only=True"
