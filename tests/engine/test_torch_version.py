"""torch older than 2.10 is refused (known checkpoint-loading CVEs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefect_torch.engine.compat import UnsupportedTorchError, check_torch_version
from prefect_torch.errors import PrefectTorchError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version", ["2.9.1", "2.9.0+cu121", "1.13.1", "0.4.1", "2.1"])
def test_old_torch_is_refused_with_the_fix(version):
    with pytest.raises(UnsupportedTorchError) as caught:
        check_torch_version(version)
    message = str(caught.value)
    assert f"PyTorch {version} is installed" in message
    assert "pip install 'torch>=2.10'" in message
    assert isinstance(caught.value, PrefectTorchError) and isinstance(caught.value, ImportError)


@pytest.mark.parametrize(
    "version, release",
    [("2.10.0", (2, 10)), ("2.13.0+cpu", (2, 13)), ("2.10.0a0+git1234", (2, 10)), ("2.11.1+cu128", (2, 11)), ("3.0.0", (3, 0))],
)
def test_current_torch_is_accepted(version, release):
    assert check_torch_version(version) == release


@pytest.mark.parametrize("version", ["", "unknown", "two.ten"])
def test_unreadable_version_is_refused(version):
    with pytest.raises(UnsupportedTorchError, match="Cannot read the installed PyTorch version"):
        check_torch_version(version)


def test_installed_torch_passes():
    import torch

    check_torch_version(torch.__version__)


def test_importing_the_engine_with_old_torch_fails():
    """The check runs at import of prefect_torch.engine: a torch reporting 2.9.1
    (a stand-in module placed in sys.modules first) stops the import."""
    script = textwrap.dedent("""
        import sys, types
        sys.modules["torch"] = types.SimpleNamespace(__version__="2.9.1")
        try:
            import prefect_torch.engine
        except ImportError as exc:
            print("refused:", exc)
        else:
            print("imported")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: PyTorch 2.9.1 is installed" in result.stdout
