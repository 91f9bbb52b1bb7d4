"""What the evaluate / sample / inpaint tools share: loading a checkpoint onto a device, clean errors."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

import torch

from . import data as data_lib
from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .data import DataError
from .model import NICE


class UsageError(ValueError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def load_for_inference(path: str, device: torch.device) -> Tuple[NICE, data_lib.Preprocess, dict]:
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload, path).to(device).eval()
    info = data_lib.dataset_info(payload["dataset"])
    preprocess = data_lib.Preprocess(info)
    try:
        preprocess.load_state_dict(payload["preprocess_state"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its preprocessing does not fit {info.name}: {error}") from None
    return model, preprocess.to(device), payload


def one_line(error: Exception) -> str:
    """An error's message as one line: wrapped causes (torchvision's download errors, say) span several."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def run_tool(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run a tool's main, turning the errors a user can cause into one line and an exit status."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
