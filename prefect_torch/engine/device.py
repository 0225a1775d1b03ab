"""Choosing the device to train on."""

from __future__ import annotations

from typing import Literal

import torch

from prefect_torch.errors import DeviceError

DeviceChoice = Literal["auto", "cpu", "cuda"]


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "device='cuda' was asked for, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). "
                "Use device='cpu' or 'auto', or run on the 'cuda' work pool."
            )
        return torch.device(choice)
    raise DeviceError(f"Unknown device {choice!r}. Use one of: auto, cpu, cuda.")


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse bf16 on a GPU that cannot run it natively, before any training starts."""
    if precision not in ("fp32", "bf16"):
        raise DeviceError(f"Unknown precision {precision!r}. Use 'fp32' or 'bf16'.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise DeviceError(
            f"precision='bf16' needs a GPU with native bfloat16 (compute capability 8.0+, e.g. A100, "
            f"H100); this one is {name}. Use precision='fp32'."
        )
