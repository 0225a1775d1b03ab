"""``torch.compile`` for the training forward pass, with errors a user can act on.

torch.compile fails late: wrapping the model always works, and the real work
(tracing, then generating C++ or Triton code and compiling it) happens at the
first call, or at a later call that needs a new graph (a ragged last batch,
eval mode). Where the toolchain is missing, PyTorch's error is a long internal
trace. ``CompiledForward`` catches it at whichever call it happens, checks that
the model itself runs without compile (so the user's own bugs keep their own
errors), and raises a ``DeviceError`` that names the cause and the fixes.

We raise instead of quietly falling back to eager: compile is something the user
asked for to go faster, and a run that silently goes slower, inside a flow whose
warnings nobody reads, is the worse surprise.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from prefect_torch.errors import DeviceError

# The torch.compile backend; tests swap in a cheaper or failing one.
BACKEND: Any = "inductor"

_FIXES = (
    "Train without it (compile=False; on the command line, drop --compile), or give this machine what "
    "torch.compile needs: a C++ compiler on the PATH for CPU training (e.g. `apt-get install g++`), "
    "Triton for CUDA (it ships with the CUDA wheels of torch), and a Python version your torch "
    "release supports for compile."
)


class CompiledForward:
    """Calls ``torch.compile(model)``; turns compile failures into a DeviceError."""

    def __init__(self, model: nn.Module, backend: Any = None):
        self.model = model
        try:
            self.compiled = torch.compile(model, backend=backend or BACKEND)
        except Exception as exc:  # e.g. unsupported Python or platform, raised at wrap time
            raise DeviceError(_message(exc, ran_eager=False)) from exc

    def __call__(self, *args: Any) -> Any:
        try:
            return self.compiled(*args)
        except Exception as exc:
            eager_error = _eager_error(self.model, args)
            if eager_error is not None:
                # The model fails without compile too: the user's own error, as plain PyTorch
                # reports it (clearer than the compiler's wrapped version).
                raise eager_error from None
            raise DeviceError(_message(exc, ran_eager=True)) from exc


def _eager_error(model: nn.Module, args: tuple) -> Exception | None:
    """The error the uncompiled model raises on these inputs, or None when it runs.

    Run in eval mode under no_grad, so the check neither updates BatchNorm
    statistics nor builds an autograd graph.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args)
        return None
    except Exception as exc:
        return exc
    finally:
        model.train(was_training)


def _message(exc: BaseException, ran_eager: bool) -> str:
    # Dynamo wraps the backend's own error (e.g. InvalidCxxCompiler); that one says what is wrong.
    root = getattr(exc, "inner_exception", None) or exc
    lines = [line for line in str(root).strip().splitlines() if line.strip()]
    cause = f"{type(root).__name__}: {lines[0] if lines else '(no message)'}"
    where = (
        "torch.compile could not compile the model on this machine, although the model runs without it"
        if ran_eager
        else "torch.compile is not available here"
    )
    return (
        f"{where} (torch {torch.__version__}, Python {sys.version_info.major}.{sys.version_info.minor}, "
        f"{sys.platform}). Cause: {cause}. {_FIXES}"
    )
