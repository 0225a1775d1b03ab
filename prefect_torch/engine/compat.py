"""Refusing PyTorch versions that are unsafe to run with.

torch older than 2.10 has known checkpoint-loading vulnerabilities (code execution
through crafted files), so the engine will not start on it, rather than relying on
every caller to load files carefully.
"""

from __future__ import annotations

import re
import sys

from prefect_torch.errors import PrefectTorchError

MIN_TORCH = (2, 10)

_RELEASE = re.compile(r"^\s*v?(\d+)\.(\d+)")


class UnsupportedTorchError(PrefectTorchError, ImportError):
    """The installed PyTorch is too old (or unrecognisable) to use safely."""


def check_torch_version(version: str) -> tuple[int, int]:
    """Raise ``UnsupportedTorchError`` unless ``version`` is torch 2.10 or newer.

    Only the release's major.minor counts: local tags (``+cpu``, ``+cu128``) and
    pre-release suffixes of an accepted release line (``2.10.0a0``) are accepted.
    Returns the (major, minor) pair that was checked.
    """
    minimum = ".".join(map(str, MIN_TORCH))
    fix = f"pip install 'torch>={minimum}'"
    match = _RELEASE.match(str(version))
    if match is None:
        raise UnsupportedTorchError(
            f"Cannot read the installed PyTorch version {version!r}; prefect-torch needs "
            f"torch>={minimum}. Reinstall it with: {fix}"
        )
    release = (int(match.group(1)), int(match.group(2)))
    if release < MIN_TORCH:
        raise UnsupportedTorchError(
            f"PyTorch {version} is installed, but prefect-torch needs torch>={minimum}: older "
            f"versions have known checkpoint-loading vulnerabilities. Upgrade with: {fix}"
        )
    return release


def installed_torch_version() -> str:
    """The version of the torch in use, without importing torch when it is not loaded yet.

    Importing torch takes seconds; the torch-free parts of the engine (data loading,
    file I/O) should not pay that just to be checked.
    """
    module = sys.modules.get("torch")
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        raise UnsupportedTorchError(
            f"PyTorch is not installed; prefect-torch needs it. Install it with: "
            f"pip install 'torch>={'.'.join(map(str, MIN_TORCH))}'"
        ) from None


__all__ = ["MIN_TORCH", "UnsupportedTorchError", "check_torch_version", "installed_torch_version"]
